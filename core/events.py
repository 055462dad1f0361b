"""Domain events: services say what happened; subscribers react once the write committed.

A service calls ``emit("rollout.paused", {...})`` inside its transaction. Nothing happens
until the transaction commits (at once outside one), so no subscriber ever hears of a
state that was rolled back. Then every subscriber whose pattern matches receives the
:class:`Event`, each on its own: one subscriber's failure is logged and the others still
run. Subscribers are registered in their app's ``AppConfig.ready()``:

- ``fleet``: webhooks (public events only) and the agents' nudge;
- ``frontend``: the dashboard's live updates (every event);
- ``training``: retraining a flagged model, and waking devices long-polling for rounds.

So an app announces without knowing who listens, and the layers stay one-way: fleet
never imports the dashboard or training to tell them something.

Every event type is in :data:`EVENT_TYPES` with the keys its payload always carries
(more keys may follow). *Public* events are what webhook receivers get; the others are
notices inside the product (the dashboard, nudges) and never leave it. Payloads are JSON
objects: ids and states, small, readable by anyone who subscribes.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import transaction

__all__ = [
    "EVENT_TYPES",
    "Event",
    "EventType",
    "emit",
    "public_event_types",
    "subscribe",
    "subscribed",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EventType:
    """One kind of event: its name, what it means, the payload keys it always carries."""

    name: str
    description: str
    payload: tuple[str, ...]
    public: bool = True


@dataclass(frozen=True)
class Event:
    """One event as subscribers receive it."""

    name: str
    payload: Mapping[str, Any]
    public: bool


_ROLLOUT = ("rollout_id", "name", "version_id", "status", "wave", "reason")
_EXPERIMENT = ("experiment_id", "name", "status", "winner_arm")
_SHADOW = ("shadow_id", "version_id", "status", "devices", "sample_rate", "reason")

EVENT_TYPES: dict[str, EventType] = {
    t.name: t
    for t in (
        EventType("rollout.started", "A rollout opened its first wave.", _ROLLOUT),
        EventType("rollout.wave_started", "A rollout opened its next wave.", _ROLLOUT),
        EventType("rollout.paused", "A rollout paused (operator, gate or error threshold).", _ROLLOUT),
        EventType("rollout.resumed", "A paused rollout runs again.", _ROLLOUT),
        EventType("rollout.succeeded", "A rollout's last wave passed.", _ROLLOUT),
        EventType("rollout.aborted", "A rollout was stopped for good.", _ROLLOUT),
        EventType("rollout.rolled_back", "A rollout sent its devices back.", _ROLLOUT),
        EventType(
            "rollout.shadow_passed", "A rollout's candidate passed in shadow; its first wave opens.", _ROLLOUT
        ),
        EventType(
            "rollout.shadow_failed", "A rollout's candidate failed in shadow; no wave opened.", _ROLLOUT
        ),
        EventType("experiment.started", "An A/B experiment assigned its arms.", _EXPERIMENT),
        EventType("experiment.stopped", "An experiment stopped (guardrail or operator).", _EXPERIMENT),
        EventType("experiment.completed", "An experiment declared a winner.", _EXPERIMENT),
        EventType("experiment.promoted", "An experiment's winner became a rollout.", _EXPERIMENT),
        EventType("federated_job.status", "A federated job changed status.", ("job", "status")),
        EventType(
            "federated_job.auto_ship_skipped",
            "A succeeded job that drift started was not shipped (the policy said to): why.",
            ("decision_id", "job", "version_id", "code"),
        ),
        EventType(
            "federated_job.shipped",
            "A federated job's best version was shipped: a staged rollout with a control cohort started.",
            (
                "job",
                "round",
                "version_id",
                "rollout_id",
                "target_group",
                "variant",
                "held_back",
                "control_devices",
            ),
        ),
        EventType(
            "federated_round.status",
            "A federated round changed status (collecting, aggregating, done, failed).",
            ("job", "round", "status"),
        ),
        EventType(
            "model.flagged",
            "A model version's quality on labelled feedback fell below its evaluation, or its inputs "
            "drifted on several boards (reason input_drift).",
            ("version_id", "reason", "metric", "value", "reference", "samples", "at"),
        ),
        EventType(
            "group.release_set",
            "A device group's release (what boards joining it are given) was set, replaced or cleared.",
            ("group_id", "group", "version_id", "previous_version_id", "origin_type", "origin_id", "reason"),
        ),
        EventType(
            "version.reverted",
            "A version was reverted on every device running or desiring it.",
            (
                "decision_id",
                "version_id",
                "family_id",
                "trigger",
                "reason",
                "devices_reverted",
                "devices_without_previous",
            ),
        ),
        EventType(
            "version.revert_recommended",
            "A version failed a gate or was flagged while watched; its family's policy only alerts.",
            ("decision_id", "version_id", "family_id", "trigger", "reason", "devices"),
        ),
        EventType(
            "federated_job.started_by_drift",
            "A flag started a federated job from the flagged version on the boards where it drifted.",
            ("decision_id", "job", "version_id", "family_id", "devices"),
        ),
        EventType(
            "shadow.started",
            "Devices run a candidate version in shadow beside their active one.",
            _SHADOW,
        ),
        EventType("shadow.stopped", "A shadow deployment was stopped.", _SHADOW),
        # Notices inside the product: the dashboard and the agents' nudge hear them.
        EventType(
            "model_version.created",
            "A model version was registered.",
            ("version_id", "family_id", "source", "trainable_graph"),
            public=False,
        ),
        EventType("device.enrolled", "A board enrolled.", ("device",), public=False),
        EventType(
            "device.changed", "A device's status or update state changed.", ("device", "change"), public=False
        ),
        EventType("devices.offline", "Devices were marked offline.", ("devices",), public=False),
        EventType(
            "deployment.opened",
            "A device was given a version to install.",
            ("deployment_id", "device_id", "version_id", "nudge"),
            public=False,
        ),
        EventType(
            "deployment.state_changed",
            "A deployment moved to another state.",
            ("deployment_id", "device_id", "old_state", "new_state"),
            public=False,
        ),
        EventType(
            "command.queued", "An operator queued a command for a device.", ("command_id", "device_id"), False
        ),
        EventType(
            "federated_round.opened",
            "A round opened and selected its devices.",
            ("job", "round", "round_id", "devices"),
            public=False,
        ),
        EventType(
            "provisioning_job.changed", "A provisioning job moved on or logged a step.", ("job_id",), False
        ),
    )
}


def public_event_types() -> list[str]:
    """The names webhook receivers can subscribe to, in documentation order."""
    return [name for name, t in EVENT_TYPES.items() if t.public]


Handler = Callable[[Event], None]


@dataclass
class _Subscription:
    handler: Handler
    patterns: tuple[str, ...]
    public_only: bool
    name: str = field(default="")

    def wants(self, event: Event) -> bool:
        if self.public_only and not event.public:
            return False
        return any(fnmatch.fnmatchcase(event.name, p) for p in self.patterns)


_subscriptions: list[_Subscription] = []


def subscribe(handler: Handler, *, names: Iterable[str] = ("*",), public_only: bool = False) -> Handler:
    """Call ``handler(event)`` after the commit of every event matching one of ``names``.

    ``names`` are glob patterns (``"rollout.*"``). Registering the same handler twice
    keeps one subscription. Returns the handler, so this works as a decorator helper.
    """
    patterns = tuple(names)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in EVENT_TYPES):
            raise ValueError(f"pattern {pattern!r} matches no event type")
    if not any(s.handler is handler for s in _subscriptions):
        _subscriptions.append(
            _Subscription(
                handler=handler,
                patterns=patterns,
                public_only=public_only,
                name=getattr(handler, "__qualname__", repr(handler)),
            )
        )
    return handler


@contextmanager
def subscribed(handler: Handler, *, names: Iterable[str] = ("*",)) -> Iterator[Handler]:
    """Subscribe for the duration of a ``with`` block (tests)."""
    subscribe(handler, names=names)
    try:
        yield handler
    finally:
        _subscriptions[:] = [s for s in _subscriptions if s.handler is not handler]


def _deliver(event: Event) -> None:
    for subscription in list(_subscriptions):
        if not subscription.wants(event):
            continue
        try:
            subscription.handler(event)
        except Exception:  # one subscriber's bug must not hide the event from the others
            logger.exception("event subscriber %s failed on %s", subscription.name, event.name)


def emit(name: str, payload: Mapping[str, Any]) -> None:
    """Announce event ``name`` with ``payload`` to its subscribers after the commit.

    Raises ``ValueError`` for an undocumented name or a payload missing a documented key:
    the list in :data:`EVENT_TYPES` is the contract, for webhook receivers above all.
    The payload is copied through JSON (values that are not JSON become strings), so a
    subscriber never sees a model object or a later mutation.
    """
    kind = EVENT_TYPES.get(name)
    if kind is None:
        raise ValueError(f"undocumented event type {name!r}; add it to core.events.EVENT_TYPES")
    missing = [key for key in kind.payload if key not in payload]
    if missing:
        raise ValueError(f"event {name} lacks payload keys {missing}")
    data = json.loads(json.dumps(dict(payload), default=str))
    event = Event(name=name, payload=data, public=kind.public)
    transaction.on_commit(lambda: _deliver(event))
