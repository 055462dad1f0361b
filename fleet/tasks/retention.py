"""Celery tasks: metric rollups and pruning (beat)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from fleet.services.retention import metrics_rollup, prune

__all__ = ["metrics_rollup_task", "prune_task"]


@shared_task(name="fleet.metrics_rollup")
def metrics_rollup_task() -> dict[str, Any]:
    """Periodic (beat): sum new metric samples into hourly and daily rollups."""
    return metrics_rollup()


@shared_task(name="fleet.prune")
def prune_task() -> dict[str, int]:
    """Periodic (beat): delete samples, rollups and logs past their configured ages."""
    return prune()
