"""Telling devices to heartbeat now, after the change that concerns them is committed."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.db import transaction

log = logging.getLogger(__name__)


def _send(device_ids: list[str], reason: str) -> None:
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from fleet.consumers import device_group

    layer = get_channel_layer()
    if layer is None:
        return
    try:
        for device_id in device_ids:
            async_to_sync(layer.group_send)(device_group(device_id), {"type": "nudge", "reason": reason})
    except Exception as exc:  # a nudge is an optimisation: the heartbeat interval still applies
        log.warning("could not nudge %d devices: %s", len(device_ids), exc)


def nudge_devices(device_ids: Iterable[Any], *, reason: str) -> None:
    """Ask the devices' agents to heartbeat at once, once the current transaction commits."""
    ids = [str(d) for d in device_ids]
    if ids:
        transaction.on_commit(lambda: _send(ids, reason))
