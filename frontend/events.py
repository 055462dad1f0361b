"""Live updates for the dashboard: services announce state changes on named topics.

`publish("fleet", {...})` sends one message to every browser that watches the topic,
after the surrounding transaction commits, so a page never refreshes before the rows it
will read exist. Publishing never fails the write that triggered it: the dashboard keeps
polling when the channel layer is unreachable.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from asgiref.sync import async_to_sync
from django.db import transaction

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
