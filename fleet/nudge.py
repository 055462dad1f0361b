"""Telling devices to heartbeat now: a subscriber of the events that concern a device.

A nudge carries no state: it only tells the agent to heartbeat at once, and the heartbeat
answer is the source of truth. Events arrive after the commit that caused them, so the
heartbeat that follows sees the new rows. A lost nudge costs at most one interval.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from core.events import Event

log = logging.getLogger(__name__)

# Events that ask for a nudge, and the payload key holding the device id(s).
NUDGE_EVENTS = ("deployment.opened", "command.queued", "federated_round.opened")
_REASONS = {
    "deployment.opened": "desired_version",
    "command.queued": "command",
    "federated_round.opened": "training_round",
}


def _send(device_ids: list[str], reason: str) -> None:
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer
    from django.conf import settings

    from fleet.consumers import NUDGE_GROUP, nudge_messages

    layer = get_channel_layer()
    if layer is None:
        return
    messages = nudge_messages(device_ids, reason, batch=settings.NUDGE_BATCH_DEVICES)

    async def publish() -> None:
        for message in messages:
            await layer.group_send(NUDGE_GROUP, message)

    try:
        async_to_sync(publish)()
    except Exception as exc:  # a nudge is an optimisation: the heartbeat interval still applies
        log.warning("could not nudge %d devices: %s", len(device_ids), exc)


def _device_ids(event: Event) -> Iterable[Any]:
    payload = event.payload
    if event.name == "federated_round.opened":
        return list(payload.get("devices") or [])
    if event.name == "deployment.opened" and not payload.get("nudge", True):
        return []
    return [payload["device_id"]]


def nudge_event_received(event: Event) -> None:
    """Subscriber: nudge the devices an event concerns."""
    ids = [str(d) for d in _device_ids(event)]
    if ids:
        _send(ids, _REASONS[event.name])
