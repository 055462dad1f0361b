"""Drift tasks: flag model versions whose primary metric on labelled feedback fell behind."""

from __future__ import annotations

from celery import shared_task

from fleet.services.drift import drift_check

__all__ = ["drift_check_task"]


@shared_task(name="fleet.drift_check")
def drift_check_task() -> list[int]:
    """Run `drift_check` (beat: every 60 s); returns the ids of versions flagged now."""
    return drift_check()
