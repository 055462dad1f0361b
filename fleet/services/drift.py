"""Drift: storing and scoring device sketches, and flagging versions whose accuracy drops."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Avg, Count
from django.utils import timezone

from core.events import emit
from fleet.drift import drift_score
from fleet.models import Device, DriftReport, MetricSample


def _reference_for(*, version_id: int) -> dict[str, Any] | None:
    from models_registry.drift_reference import drift_reference_compute
    from models_registry.models import ModelVersion

    metrics = ModelVersion.objects.filter(pk=version_id).values_list("metrics", flat=True).first()
    if metrics is None:
        return None
    reference = metrics.get("drift_reference")
    if reference is None:
        # Computed once per version, the first time a device reports for it.
        reference = drift_reference_compute(version_id=version_id)
    return dict(reference)


def drift_report_ingest(
    *,
    device: Device,
    sketch: dict[str, Any],
    version_id: int | None,
    window_start: datetime | None,
    window_end: datetime,
) -> DriftReport:
    """Store one window's sketch, scored against its version's reference when there is one."""
    reference = _reference_for(version_id=version_id) if version_id is not None else None
    score = None
    if reference is not None and len(reference["mean"]) == len(sketch["mean"]):
        score = drift_score(
            sketch=sketch,
            reference=reference,
            z_alert=float(settings.DRIFT_Z_ALERT),
            psi_alert=float(settings.DRIFT_PSI_ALERT),
        )
    with transaction.atomic():
        return DriftReport.objects.create(
            device=device,
            version_id=version_id if reference is not None else None,
            window_start=window_start,
            window_end=window_end,
            sketch=sketch,
            score=None if score is None else score.score,
            z_max=None if score is None else score.z_max,
            z_feature=None if score is None else score.z_feature,
            psi=None if score is None else score.psi,
            alert=bool(score and score.alert),
        )


def drift_check(*, now: datetime | None = None) -> list[int]:
    """Flag versions whose accuracy on feedback over the last hour fell below their evaluation.

    A version is flagged when it has at least `DRIFT_MIN_SAMPLES` `correct` samples in the
    hour and their mean is more than `DRIFT_ACCURACY_DROP` below `metrics["accuracy"]`.
    Versions already flagged are left alone, so running this again changes nothing.
    Each flag is announced as `model.flagged` after it commits (training subscribes:
    with `DRIFT_AUTO_RETRAIN` it starts a short federated job from the version).
    Returns the ids flagged by this call.
    """
    from models_registry.models import ModelVersion

    now = now or timezone.now()
    rows = (
        MetricSample.objects.filter(name="correct", ts__gte=now - timedelta(hours=1), version__isnull=False)
        .values("version_id")
        .annotate(accuracy=Avg("value"), samples=Count("id"))
        .filter(samples__gte=int(settings.DRIFT_MIN_SAMPLES))
    )
    flagged: list[int] = []
    for row in rows:
        with transaction.atomic():
            version = ModelVersion.objects.select_for_update().get(pk=row["version_id"])
            reference_accuracy = version.metrics.get("accuracy")
            if "flagged" in version.metrics or not isinstance(reference_accuracy, int | float):
                continue
            accuracy = float(row["accuracy"])
            if reference_accuracy - accuracy <= float(settings.DRIFT_ACCURACY_DROP):
                continue
            flag = {
                "reason": "accuracy_drop",
                "accuracy": round(accuracy, 4),
                "reference_accuracy": float(reference_accuracy),
                "samples": int(row["samples"]),
                "at": now.isoformat(),
            }
            version.metrics = {**version.metrics, "flagged": flag}
            version.save(update_fields=["metrics"])
            emit("model.flagged", {"version_id": version.pk, **flag})
            flagged.append(version.pk)
    return flagged
