"""Celery tasks: devices."""

from __future__ import annotations

from celery import shared_task

from fleet.services.devices import devices_mark_offline

__all__ = ["devices_mark_offline_task"]


@shared_task(name="fleet.devices_mark_offline")
def devices_mark_offline_task() -> int:
    """Periodic (beat): mark devices that stopped heartbeating offline."""
    return devices_mark_offline()
