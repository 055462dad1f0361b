"""Drift: storing and scoring device sketches, and flagging versions whose primary metric
on labelled feedback falls behind their evaluation (accuracy drops, mae rises), judged on
the median of the devices' own means."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import Avg, Count, F, OuterRef, Q, Subquery
from django.utils import timezone

from core.events import emit
from devices_agent.drift import drift_features
from fleet.drift import DriftScore, baseline_reference, drift_score, sketch_merge
from fleet.models import Device, DriftBaseline, DriftReport, MetricSample

log = logging.getLogger(__name__)

# The feedback metric of each task, and the task it belongs to.
FEEDBACK_METRICS = {"correct": "classification", "abs_error": "regression"}


# A reference's drift reports are scored only when a sketch follows as many features as the
# version's family yields (devices_agent.drift.drift_features, what boards sketch).
@functools.lru_cache(maxsize=256)
def _feature_count(input_shape: tuple[int, ...]) -> int:
    example = np.zeros((1, *input_shape), dtype=np.float32)
    return int(drift_features(example, input_shape).shape[1])


def family_feature_count(*, input_shape: list[int] | tuple[int, ...]) -> int | None:
    """The number of features a drift sketch of a family with ``input_shape`` follows."""
    shape = tuple(int(d) for d in input_shape or ())
    if not shape or any(d < 1 for d in shape):
        return None
    return _feature_count(shape)


def _reference_for(*, version: Any) -> dict[str, Any] | None:
    """The version's drift reference, computed once; None when its family has none."""
    from models_registry.drift_reference import drift_reference_compute

    reference = (version.metrics or {}).get("drift_reference")
    if reference is None:
        # Computed once per version, the first time a device reports for it; a family
        # without a registered data set has no reference (None).
        reference = drift_reference_compute(version_id=version.pk)
    return dict(reference) if isinstance(reference, dict) else None


def drift_report_ingest(
    *,
    device: Device,
    sketch: dict[str, Any],
    version_id: int | None,
    window_start: datetime | None,
    window_end: datetime,
) -> DriftReport:
    """Store one window's sketch, scored against its version's reference and the board's baseline.

    An alert needs a shift that is both significant (z) and large: an effect size of at
    least ``DRIFT_EFFECT_SIZE_MIN`` standard deviations, or a major per-feature PSI (above
    ``DRIFT_PSI_MAJOR``, from a window of at least ``DRIFT_PSI_MIN_SAMPLES`` inputs) when
    the sketch carries counts over the reference's bins (`fleet.drift.drift_score`); and it
    needs that twice: against the version's reference (the data it was trained on) and
    against the board's own baseline for the version (`DriftBaseline`: its first windows,
    up to ``DRIFT_BASELINE_SAMPLES`` inputs). A board whose data differs from the reference
    for good is not IID, not drifting: it alerts only once its inputs move from what they
    were when it started running the version. Windows are judged once they hold
    ``DRIFT_WINDOW_MIN_SAMPLES`` inputs, short ones merged with the board's next (`_judge`).
    Every report is scored against the reference on its own and shown; the baseline numbers
    are those of the window judged, None when the report was not judged (part of the
    baseline, or waiting for more inputs). ``DRIFT_BASELINE_SAMPLES = 0`` judges each window
    against the reference alone.

    A report gets no score (and no alert) when its version is unknown, its family has no
    reference, or the sketch does not follow as many features as the family's inputs give;
    the PSI part of the score is left out when the reference has no confidence histogram
    (regression models have no confidence).
    """
    from models_registry.models import ModelVersion

    version = (
        ModelVersion.objects.select_related("family").filter(pk=version_id).first()
        if version_id is not None
        else None
    )
    reference = None
    if version is not None and family_feature_count(input_shape=version.family.input_shape) == len(
        sketch["mean"]
    ):
        reference = _reference_for(version=version)
    score = None
    if reference is not None and len(reference.get("mean") or []) == len(sketch["mean"]):
        score = drift_score(sketch=sketch, reference=reference, **_thresholds())
    with transaction.atomic():
        own = None
        judged_alone = int(settings.DRIFT_BASELINE_SAMPLES) <= 0
        alert = bool(score and score.alert and judged_alone)
        if score is not None and version is not None and reference is not None and not judged_alone:
            alert, own = _judge(
                device=device, version=version, sketch=sketch, reference=reference, score=score
            )
        report = DriftReport.objects.create(
            device=device,
            version_id=version.pk if version is not None else None,
            window_start=window_start,
            window_end=window_end,
            sketch=sketch,
            score=None if score is None else score.score,
            z_max=None if score is None else score.z_max,
            z_feature=None if score is None else score.z_feature,
            psi=None if score is None else score.psi,
            effect_size=None if score is None else score.effect_size,
            effect_feature=None if score is None else score.effect_feature,
            feature_psi=None if score is None else score.feature_psi,
            feature_psi_feature=None if score is None else score.feature_psi_feature,
            psi_band="" if score is None or score.psi_band is None else score.psi_band,
            baseline_score=None if own is None else own.score,
            baseline_effect_size=None if own is None else own.effect_size,
            baseline_feature_psi=None if own is None else own.feature_psi,
            alert=alert,
        )
        device_drift_latest(device_id=device.pk, alert=alert, window_end=window_end)
        return report


def device_drift_latest(*, device_id: Any, alert: bool, window_end: datetime) -> None:
    """Keep the device's latest verdict on its row, unless a later window already gave one
    (a window re-sent late does not overwrite a newer verdict)."""
    Device.objects.filter(pk=device_id).filter(
        Q(drift_window_end__isnull=True) | Q(drift_window_end__lte=window_end)
    ).update(drift_alert=alert, drift_window_end=window_end)


def _thresholds() -> dict[str, Any]:
    return {
        "z_alert": float(settings.DRIFT_Z_ALERT),
        "psi_alert": float(settings.DRIFT_PSI_ALERT),
        "effect_min": float(settings.DRIFT_EFFECT_SIZE_MIN),
        "psi_moderate": float(settings.DRIFT_PSI_MODERATE),
        "psi_major": float(settings.DRIFT_PSI_MAJOR),
        "psi_min_samples": int(settings.DRIFT_PSI_MIN_SAMPLES),
    }


def _judge(
    *, device: Device, version: Any, sketch: dict[str, Any], reference: dict[str, Any], score: DriftScore
) -> tuple[bool, DriftScore | None]:
    """The verdict on the board's window (alert, and its score against the baseline).

    While the board's baseline for the version is being made, the window becomes part of
    it (no verdict). After, a window of fewer than ``DRIFT_WINDOW_MIN_SAMPLES`` inputs waits
    for the board's next ones: a mean over a handful of inputs strays by chance, and the
    largest of a hundred features' strays more. The window that brings them to that many
    is judged, merged with them, against the reference and against the baseline.
    ``score``: the window alone against the reference (what a window judged alone gets).
    """
    baseline, _ = DriftBaseline.objects.select_for_update().get_or_create(device=device, version=version)
    if int(sketch["count"]) == 0:
        return False, None
    if not baseline.complete:
        baseline.sketch = sketch_merge(baseline.sketch or None, sketch)
        baseline.windows += 1
        baseline.complete = int(baseline.sketch["count"]) >= int(settings.DRIFT_BASELINE_SAMPLES)
        baseline.save(update_fields=["sketch", "windows", "complete", "updated_at"])
        return False, None
    window = sketch_merge(baseline.pending or None, sketch)
    if int(window["count"]) < int(settings.DRIFT_WINDOW_MIN_SAMPLES):
        baseline.pending = window
        baseline.save(update_fields=["pending", "updated_at"])
        return False, None
    thresholds = _thresholds()
    against_reference = score
    if baseline.pending:
        against_reference = drift_score(sketch=window, reference=reference, **thresholds)
        baseline.pending = {}
        baseline.save(update_fields=["pending", "updated_at"])
    own = baseline_reference(baseline=baseline.sketch, reference=reference)
    against_baseline = drift_score(sketch=window, reference=own, **thresholds)
    return against_reference.alert and against_baseline.alert, against_baseline


def _flag_for(
    *, version: Any, name: str, mean: float, samples: int, devices: int, now: datetime
) -> dict[str, Any] | None:
    """The flag a version earns from its feedback over the hour (``mean``: the median of the
    devices' means), or None."""
    evaluated = version.metrics or {}
    if name == "correct":
        reference = evaluated.get("accuracy")
        if not isinstance(reference, int | float) or reference - mean <= float(settings.DRIFT_ACCURACY_DROP):
            return None
        return {
            "reason": "accuracy_drop",
            "metric": "accuracy",
            "value": round(mean, 4),
            "reference": float(reference),
            "accuracy": round(mean, 4),
            "reference_accuracy": float(reference),
            "samples": samples,
            "devices": devices,
            "at": now.isoformat(),
        }
    reference = evaluated.get("mae")
    rise = float(settings.DRIFT_MAE_RISE)
    if not isinstance(reference, int | float) or mean - reference <= rise * abs(reference):
        return None
    return {
        "reason": "mae_rise",
        "metric": "mae",
        "value": round(mean, 6),
        "reference": float(reference),
        "mae": round(mean, 6),
        "reference_mae": float(reference),
        "samples": samples,
        "devices": devices,
        "at": now.isoformat(),
    }


@dataclass(frozen=True)
class FeedbackVote:
    """A version's feedback metric over the hour, device by device."""

    median: float  # the median of the devices' means
    devices: int  # devices with DRIFT_MIN_SAMPLES_PER_DEVICE samples
    samples: int  # the samples behind them


def feedback_votes(*, since: datetime) -> dict[tuple[int, str], FeedbackVote]:
    """(version id, feedback metric) -> the devices' verdict, for the versions with enough
    devices and samples. One query (GROUP BY version, metric, device)."""
    per_device = int(settings.DRIFT_MIN_SAMPLES_PER_DEVICE)
    rows = (
        MetricSample.objects.filter(name__in=FEEDBACK_METRICS, ts__gte=since, version__isnull=False)
        .values("version_id", "name", "device_id")
        .annotate(mean=Avg("value"), samples=Count("id"))
        .filter(samples__gte=per_device)
        .order_by()
    )
    means: dict[tuple[int, str], list[float]] = {}
    counts: dict[tuple[int, str], int] = {}
    for row in rows:
        key = (int(row["version_id"]), str(row["name"]))
        means.setdefault(key, []).append(float(row["mean"]))
        counts[key] = counts.get(key, 0) + int(row["samples"])
    votes: dict[tuple[int, str], FeedbackVote] = {}
    for key, values in means.items():
        if len(values) >= int(settings.DRIFT_MIN_DEVICES) and counts[key] >= int(settings.DRIFT_MIN_SAMPLES):
            votes[key] = FeedbackVote(float(np.median(values)), len(values), counts[key])
    return votes


def drift_check(*, now: datetime | None = None) -> list[int]:
    """Flag versions whose primary metric on feedback over the last hour fell behind their evaluation.

    Devices vote, not samples: each device's mean over the hour of its family's feedback
    metric (`correct` for classification, `abs_error` for regression) counts once it has
    `DRIFT_MIN_SAMPLES_PER_DEVICE` samples, and the version is judged on the median of
    those means, only with at least `DRIFT_MIN_DEVICES` devices and `DRIFT_MIN_SAMPLES`
    samples among them. So one device reporting nothing but failures cannot flag a good
    version, nor one reporting nothing but successes hide a bad one. A classification
    version is flagged when that median is more than `DRIFT_ACCURACY_DROP` below
    `metrics["accuracy"]`; a regression version when it is more than `DRIFT_MAE_RISE`
    (relative: 0.25 is 25 %) above `metrics["mae"]`. Each version is judged on its
    family's feedback metric only. Versions already flagged are left alone, so running
    this again changes nothing. Each flag is announced as the public event
    ``model.flagged`` (webhooks, the dashboard, the family policy's watch and drift job).
    Input drift is checked too (``input_drift_check``). Returns the ids flagged by this call.
    """
    from models_registry.models import ModelVersion

    now = now or timezone.now()
    votes = feedback_votes(since=now - timedelta(hours=1))
    flagged: list[int] = []
    for (version_id, name), vote in sorted(votes.items()):
        with transaction.atomic():
            version = ModelVersion.objects.select_for_update().select_related("family").get(pk=version_id)
            if "flagged" in (version.metrics or {}):
                continue
            if FEEDBACK_METRICS[name] != version.family.task:
                continue  # another task's feedback says nothing about this version
            flag = _flag_for(
                version=version,
                name=name,
                mean=vote.median,
                samples=vote.samples,
                devices=vote.devices,
                now=now,
            )
            if flag is None:
                continue
            version.metrics = {**version.metrics, "flagged": flag}
            version.save(update_fields=["metrics"])
            emit("model.flagged", {"version_id": version.pk, **flag})
            flagged.append(version.pk)
    flagged.extend(input_drift_check(now=now))
    drift_groups_count(now=now)
    return flagged


def drift_groups_count(*, now: datetime) -> None:
    """Count the devices reporting and in alert per group, for pages to read
    (`fleet.selectors.drift.drift_groups_counted`); kept for three checks' time."""
    from django.core.cache import cache

    from fleet.selectors.drift import DRIFT_GROUPS_CACHE_KEY, drift_reporting_groups

    counted = {"groups": drift_reporting_groups(), "at": now.isoformat()}
    try:
        cache.set(DRIFT_GROUPS_CACHE_KEY, counted, timeout=3 * float(settings.DRIFT_CHECK_S))
    except Exception:  # noqa: BLE001 - without a cache, pages count for themselves
        log.warning("drift counts not cached", exc_info=True)


INPUT_DRIFT_KEY = "input_drift_flagged"


def input_drift_check(*, now: datetime) -> list[int]:
    """Flag versions whose inputs drifted on at least ``DRIFT_MIN_DEVICES`` boards running them.

    A board counts while it is in alert: its latest drift report, from the last hour, is for
    the version it runs and alerted (an alert needs a shift both significant and large, from
    the reference and from the board's own baseline: ``drift_report_ingest``),
    so one board cannot flag a version, and a third of a fleet can. The flag (reason
    ``input_drift``, with how many boards alerted of how many run the version and the
    median effect size) is kept apart from the feedback flag (``metrics["flagged"]``): a
    shift of the inputs is not evidence that the version is worse, so it does not revert
    a watched version; it is what can start a federated job on those boards (the family
    policy's ``drift_job``). Announced as ``model.flagged``, once per version.
    """
    from models_registry.models import ModelVersion

    # Boards in alert now: their latest report alerted, within the hour, for the version they
    # still run. One window's alert that the next does not repeat is noise, not drift.
    latest = DriftReport.objects.filter(device_id=OuterRef("device_id")).order_by("-window_end", "-id")
    alerting = DriftReport.objects.filter(
        alert=True,
        window_end__gte=now - timedelta(hours=1),
        version__isnull=False,
        device__running_version_id=F("version_id"),
        pk=Subquery(latest.values("pk")[:1]),
    ).exclude(device__status=Device.Status.DECOMMISSIONED)
    rows = (
        alerting.values("version_id")
        .annotate(devices=Count("device_id", distinct=True))
        .filter(devices__gte=int(settings.DRIFT_MIN_DEVICES))
        .order_by("version_id")
    )
    flagged: list[int] = []
    for row in rows:
        with transaction.atomic():
            version = ModelVersion.objects.select_for_update().filter(pk=row["version_id"]).first()
            if version is None or INPUT_DRIFT_KEY in (version.metrics or {}):
                continue
            effects = list(alerting.filter(version_id=version.pk).values_list("effect_size", flat=True))
            running = (
                Device.objects.filter(running_version_id=version.pk)
                .exclude(status=Device.Status.DECOMMISSIONED)
                .count()
            )
            sizes = [float(e) for e in effects if e is not None]
            flag = {
                "reason": "input_drift",
                "metric": "drift_alert_devices",
                "value": int(row["devices"]),
                "reference": int(settings.DRIFT_MIN_DEVICES),
                "devices": int(row["devices"]),
                "running": running,
                "effect_size": round(float(np.median(sizes)), 4) if sizes else None,
                "samples": len(effects),
                "at": now.isoformat(),
            }
            version.metrics = {**version.metrics, INPUT_DRIFT_KEY: flag}
            version.save(update_fields=["metrics"])
            emit("model.flagged", {"version_id": version.pk, **flag})
            flagged.append(version.pk)
    return flagged
