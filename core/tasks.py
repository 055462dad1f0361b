"""The Celery task of core: the sweep that re-drives work whose message was lost."""

from __future__ import annotations

from typing import Any

from celery import shared_task

__all__ = ["sweep"]


@shared_task(name="core.sweep", ignore_result=True)
def sweep() -> dict[str, list[Any]]:
    """Periodic (beat, ``SWEEP_INTERVAL_S``): re-send leased work nobody holds (:mod:`core.sweep`)."""
    from core import sweep as sweeping

    return sweeping.sweep()
