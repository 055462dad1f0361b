"""Reads about shipped versions: the rollouts a federated job's result started."""

from __future__ import annotations

from fleet.models import Rollout


def rollouts_shipped_from_job(*, job_id: int) -> list[Rollout]:
    """The rollouts shipped from a federated job, newest first (their origin names the job)."""
    return list(
        Rollout.objects.filter(origin__federated_job=job_id).select_related("version__family", "target_group")
    )
