"""Celery tasks: devices."""

from __future__ import annotations

from celery import shared_task

from fleet.services.devices import devices_mark_offline
from fleet.services.liveness import LivenessUnavailable, liveness_flush

__all__ = ["devices_mark_offline_task", "liveness_flush_task"]


@shared_task(name="fleet.devices_mark_offline")
def devices_mark_offline_task() -> int:
    """Periodic (beat): mark devices that stopped heartbeating offline."""
    return devices_mark_offline()


@shared_task(name="fleet.liveness_flush")
def liveness_flush_task() -> int:
    """Periodic (beat): write the heartbeats' buffered `last_seen` to the device rows."""
    try:
        return liveness_flush()
    except LivenessUnavailable:
        return 0  # Redis is away: heartbeats write their rows themselves meanwhile
