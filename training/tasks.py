"""Celery tasks of the training app: ids in, one service call, safe to run twice."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from training import services


@shared_task(name="training.round_open")
def round_open(job_id: int) -> int | None:
    """Open the job's next round (no-op when one is already open)."""
    rnd = services.round_open(job_id=job_id)
    return rnd.pk if rnd is not None else None


@shared_task(name="training.round_close")
def round_close(round_id: int) -> str | None:
    """Close a round once every selected device answered or its deadline passed."""
    rnd = services.round_close(round_id=round_id)
    return rnd.status if rnd is not None else None


@shared_task(name="training.round_aggregate")
def round_aggregate(round_id: int) -> str | None:
    """Aggregate, evaluate and register a closed round (resumes from its checkpoint)."""
    rnd = services.round_aggregate(round_id=round_id)
    return rnd.status if rnd is not None else None


@shared_task(name="training.shard_aggregate")
def shard_aggregate(shard_id: int) -> str | None:
    """Sum one shard of a large round into its partial sum (resumes from its checkpoint)."""
    shard = services.shard_aggregate(shard_id=shard_id)
    return shard.status if shard is not None else None


@shared_task(name="training.rounds_tick")
def rounds_tick() -> dict[str, Any]:
    """Periodic: deadlines and pending selections, and the recovery of every training
    task whose message was lost (see ``services.rounds_tick``)."""
    return services.rounds_tick()
