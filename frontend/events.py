"""Live updates for the dashboard: domain events become messages on named topics.

:func:`event_received` subscribes to every domain event (``core.events``, registered in
``FrontendConfig.ready``) and relays it to the topics of the pages that show it; an event
arrives after the transaction that caused it committed, so a page never refreshes before
the rows it will read exist. `publish("fleet", {...})` sends one message to every browser
that watches a topic. Publishing never fails anything: the dashboard keeps polling when
the channel layer is unreachable.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from asgiref.sync import async_to_sync
from django.db import transaction

from core.events import Event

log = logging.getLogger(__name__)

# Topics are group names in the channel layer: short, ASCII, no dots or spaces.
TOPIC_RE = re.compile(r"^[a-z][a-z0-9_]{0,30}(-[a-z0-9_]{1,40})?$")
EVENT_TYPE = "live.event"

# Well-known topics (the dashboard subscribes to these by name).
FLEET = "fleet"
MODELS = "models"
ROLLOUTS = "rollouts"
EXPERIMENTS = "experiments"
FEDERATED = "federated"
PROVISIONING = "provisioning"


def topic_for(kind: str, object_id: Any) -> str:
    """The topic of one object, e.g. `topic_for("rollout", 3) == "rollout-3"`."""
    return f"{kind}-{object_id}"


def _send(topic: str, payload: dict[str, Any]) -> None:
    try:
        from channels.layers import get_channel_layer

        layer = get_channel_layer()
        if layer is None:
            return
        async_to_sync(layer.group_send)(topic, {"type": EVENT_TYPE, "topic": topic, "payload": payload})
    except Exception:  # noqa: BLE001  (a lost notification only delays a refresh: pages also poll)
        log.warning("could not publish a live event on %s", topic, exc_info=True)


def publish(topic: str, payload: dict[str, Any] | None = None) -> None:
    """Tell the browsers watching `topic` that something changed, once the transaction commits.

    Outside a transaction the message goes out at once. `payload` must be JSON-serialisable
    and small (ids and states): pages fetch the details themselves.
    """
    if not TOPIC_RE.match(topic):
        raise ValueError(f"invalid topic name: {topic!r}")
    body = dict(payload or {})
    transaction.on_commit(lambda: _send(topic, body))


# Event types the apps emit (webhooks) -> the dashboard topics that show them:
# (list topic, per-object topic kind, payload key holding the object id)
_EVENT_TOPICS: dict[str, tuple[str, str, str]] = {
    "rollout": (ROLLOUTS, "rollout", "rollout_id"),
    "experiment": (EXPERIMENTS, "experiment", "experiment_id"),
    "federated_job": (FEDERATED, "job", "job"),
    "federated_round": (FEDERATED, "job", "job"),
    "provisioning_job": (PROVISIONING, "provisioning", "job_id"),
    # A group's release changed: the group's page and the fleet's lists.
    "group": (FLEET, "group", "group_id"),
    # A shadow started or stopped: its version's page.
    "shadow": (MODELS, "version", "version_id"),
}


def topics_for_event(event_type: str, payload: dict[str, Any]) -> list[str]:
    """The topics an app event concerns: its list page's and its object's."""
    prefix = event_type.split(".", 1)[0]
    mapped = _EVENT_TOPICS.get(prefix)
    if mapped is None:
        return []
    list_topic, kind, key = mapped
    topics = [list_topic]
    object_id = payload.get(key, payload.get("id"))
    if isinstance(object_id, int) or (isinstance(object_id, str) and object_id.isdigit()):
        topics.append(topic_for(kind, object_id))
    # Rollouts and experiments move devices: the fleet's pages change with them.
    if prefix in ("rollout", "experiment"):
        topics.append(FLEET)
    return topics


def _scalars(payload: Any) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if isinstance(v, str | int | float | None)}


def publish_device(device_id: Any, *, change: str = "status") -> None:
    """A device changed in a way lists show (enrolled, online/offline, update state)."""
    publish(FLEET, {"device": str(device_id), "change": change})
    hex_id = getattr(device_id, "hex", None) or str(device_id).replace("-", "")
    publish(topic_for("device", hex_id), {"change": change})


def publish_provisioning(job_id: int) -> None:
    """A provisioning job moved on or logged a step."""
    publish(PROVISIONING, {"job": job_id})
    publish(topic_for("provisioning", job_id), {"job": job_id})


def event_received(event: Event) -> None:
    """Subscriber of every domain event: refresh the pages that show what changed."""
    payload = event.payload
    if event.name == "device.enrolled":
        publish_device(payload["device"], change="enrolled")
    elif event.name == "device.changed":
        publish_device(payload["device"], change=str(payload["change"]))
    elif event.name == "deployment.state_changed":
        publish_device(payload["device_id"], change="deployment")
    elif event.name == "devices.offline":
        publish(FLEET, {"change": "offline", "devices": payload["devices"]})
    elif event.name == "provisioning_job.changed":
        publish_provisioning(int(payload["job_id"]))
    elif event.public:
        body = {"event": event.name, **_scalars(payload)}
        for topic in topics_for_event(event.name, dict(payload)):
            publish(topic, body)
