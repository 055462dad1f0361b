"""Reads for reverting versions and for drift-started jobs: a family's effective policy,
whether a version is watched, the boards where a version drifted, the decisions taken."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import Avg, Count, QuerySet

from fleet.models import Device, DriftReport, FamilyPolicy, MetricSample, Rollout, VersionDecision

__all__ = [
    "EffectivePolicy",
    "drifted_device_ids",
    "family_policy",
    "version_decisions",
    "watching_rollout",
]


@dataclass(frozen=True)
class EffectivePolicy:
    """A family's policy with the settings' defaults filled in."""

    family_id: int
    on_failure: str
    watch_s: int
    drift_job: bool
    drift_job_interval_s: int
    auto_ship: bool
    stored: bool  # False: the family has no row, every value is a default

    def as_dict(self) -> dict[str, Any]:
        return {
            "family": self.family_id,
            "on_failure": self.on_failure,
            "watch_s": self.watch_s,
            "drift_job": self.drift_job,
            "drift_job_interval_s": self.drift_job_interval_s,
            "auto_ship": self.auto_ship,
            "stored": self.stored,
        }


def family_policy(*, family_id: int) -> EffectivePolicy:
    """The policy that applies to a family's versions (defaults: alert, no drift job)."""
    row = FamilyPolicy.objects.filter(family_id=family_id).first()
    watch = int(settings.VERSION_WATCH_S)
    interval = int(settings.DRIFT_JOB_INTERVAL_S)
    if row is None:
        return EffectivePolicy(family_id, FamilyPolicy.OnFailure.ALERT, watch, False, interval, False, False)
    return EffectivePolicy(
        family_id=family_id,
        on_failure=row.on_failure,
        watch_s=watch if row.watch_s is None else int(row.watch_s),
        drift_job=row.drift_job,
        drift_job_interval_s=interval if row.drift_job_interval_s is None else int(row.drift_job_interval_s),
        auto_ship=row.auto_ship,
        stored=True,
    )


def watching_rollout(*, version_id: int, watch_s: int, now: datetime) -> Rollout | None:
    """The newest rollout of the version that succeeded within ``watch_s``: it keeps the
    version watched. None: the version is not watched (never succeeded, or too long ago)."""
    return (
        Rollout.objects.filter(
            version_id=version_id,
            status=Rollout.Status.SUCCEEDED,
            finished_at__gte=now - timedelta(seconds=watch_s),
        )
        .order_by("-finished_at", "-id")
        .first()
    )


def drifted_device_ids(*, version: Any, now: datetime) -> list[str]:
    """The boards running ``version`` where it drifted, sorted.

    A board counts when one of its drift reports for the version alerted within
    ``DRIFT_JOB_LOOKBACK_S``, or when its own feedback over the last hour fell behind the
    version's evaluation as the version's flag judges it (accuracy more than
    ``DRIFT_ACCURACY_DROP`` below, mae more than ``DRIFT_MAE_RISE`` above), with at least
    ``DRIFT_MIN_SAMPLES_PER_DEVICE`` samples. One query each (GROUP BY device).
    """
    running = Device.objects.filter(running_version_id=version.pk).exclude(
        status=Device.Status.DECOMMISSIONED
    )
    alerted = set(
        DriftReport.objects.filter(
            version_id=version.pk,
            alert=True,
            window_end__gte=now - timedelta(seconds=int(settings.DRIFT_JOB_LOOKBACK_S)),
            device__in=running,
        )
        .values_list("device_id", flat=True)
        .distinct()
    )
    evaluated = version.metrics or {}
    task = version.family.task
    name, reference = ("correct", evaluated.get("accuracy"))
    if task == "regression":
        name, reference = ("abs_error", evaluated.get("mae"))
    fell: set[Any] = set()
    if isinstance(reference, int | float):
        rows = (
            MetricSample.objects.filter(
                version_id=version.pk, name=name, ts__gte=now - timedelta(hours=1), device__in=running
            )
            .values("device_id")
            .annotate(mean=Avg("value"), samples=Count("id"))
            .filter(samples__gte=int(settings.DRIFT_MIN_SAMPLES_PER_DEVICE))
            .order_by()
        )
        for row in rows:
            mean = float(row["mean"])
            if name == "correct" and reference - mean > float(settings.DRIFT_ACCURACY_DROP):
                fell.add(row["device_id"])
            if name == "abs_error" and mean - reference > float(settings.DRIFT_MAE_RISE) * abs(reference):
                fell.add(row["device_id"])
    return sorted(str(d) for d in alerted | fell)


def version_decisions(
    *, version_id: int | None = None, family_id: int | None = None
) -> QuerySet[VersionDecision]:
    """Decisions about versions, newest first, optionally for one version or family."""
    qs = VersionDecision.objects.all()
    if version_id is not None:
        qs = qs.filter(version_id=version_id)
    if family_id is not None:
        qs = qs.filter(family_id=family_id)
    return qs.order_by("-created_at", "-id")
