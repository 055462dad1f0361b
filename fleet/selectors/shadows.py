"""Reads for shadow deployments: per-device figures of the candidate and the fleet's medians.

The active versions' ``correct`` and ``abs_error`` on the same devices over the same
window sit beside the candidate's (``active_accuracy``, ``active_mae``). Devices are the
unit, as in every other decision figure (``device_metric_stats``): each
device's samples of the shadow version (since the shadow started, until it stopped) are
averaged per metric, and the fleet figure is the median of those per-device means over
the devices with at least ``min_samples`` samples of that metric.
"""

from __future__ import annotations

import statistics
from datetime import datetime
from typing import Any

from django.db.models import Count, QuerySet
from django.utils import timezone

from fleet.models import MetricSample, Rollout, Shadow, ShadowMember
from fleet.rollouts.shadow_gate import ShadowVerdict, judge_shadow
from fleet.selectors.rollouts import device_metric_stats

# Metric -> the name of its per-device mean in the report.
SHADOW_METRICS = {
    "shadow_agreement": "agreement",
    "shadow_correct": "accuracy",
    "shadow_error": "mae",
    "shadow_latency_ms": "latency_ms",
}
# The active model's feedback metrics on the same devices, for comparison.
ACTIVE_METRICS = {"correct": "active_accuracy", "abs_error": "active_mae"}


def shadow_list() -> QuerySet[Shadow]:
    """Shadows, newest first, with their version and group joined and their members counted."""
    return (
        Shadow.objects.select_related("version__family", "group")
        .annotate(member_count=Count("members"))
        .order_by("-id")
    )


def shadow_member_count(*, shadow: Shadow) -> int:
    """How many devices the shadow reached (counted by :func:`shadow_list` when it was read)."""
    counted = getattr(shadow, "member_count", None)
    return int(counted) if counted is not None else ShadowMember.objects.filter(shadow=shadow).count()


def shadow_artifact(*, device: Any, sha256: str) -> tuple[str, int] | None:
    """(storage name, size) of the ONNX graph with this digest when it is the candidate of
    a running shadow the device is in: what the agent may download to shadow it."""
    from models_registry.models import Artifact

    version_ids = ShadowMember.objects.filter(
        device=device, active=True, shadow__status=Shadow.Status.RUNNING
    ).values("shadow__version_id")
    found = (
        Artifact.objects.filter(sha256=sha256, kind="onnx", version_id__in=version_ids)
        .values_list("file", "size")
        .first()
    )
    return (str(found[0]), int(found[1])) if found else None


def shadow_report(*, shadow: Shadow, min_samples: int = 1) -> dict[str, Any]:
    """Per-device rows (samples and means of agreement, accuracy, mae, latency, and the
    active versions' accuracy and mae over the same window) and the medians over devices."""
    members = list(
        ShadowMember.objects.filter(shadow=shadow)
        .select_related("device")
        .order_by("device__name")
        .values_list("device_id", "device__name", "active")
    )
    until = shadow.stopped_at or timezone.now()
    device_ids = [str(m[0]) for m in members]
    stats = device_metric_stats(
        version_ids=[shadow.version_id],
        since=shadow.created_at,
        until=until,
        devices=device_ids,
        names=list(SHADOW_METRICS),
    )
    # The active versions' own figures over the same window on the same devices: a
    # feedback on a shadowed prediction records both, so the two are compared pairwise.
    active_ids = (
        MetricSample.objects.filter(
            device_id__in=device_ids, name__in=list(ACTIVE_METRICS), ts__gte=shadow.created_at, ts__lt=until
        )
        .exclude(version_id=shadow.version_id)
        .exclude(version_id__isnull=True)
        .values_list("version_id", flat=True)
        .distinct()
    )
    active = device_metric_stats(
        version_ids=list(active_ids),
        since=shadow.created_at,
        until=until,
        devices=device_ids,
        names=list(ACTIVE_METRICS),
    )
    rows: list[dict[str, Any]] = []
    labels = [*SHADOW_METRICS.values(), *ACTIVE_METRICS.values()]
    votes: dict[str, list[float]] = {label: [] for label in labels}
    for device_id, name, is_member in members:
        mine = {**stats.get(str(device_id), {}), **active.get(str(device_id), {})}
        row: dict[str, Any] = {"device": str(device_id), "name": name, "active": is_member}
        for metric, label in (*SHADOW_METRICS.items(), *ACTIVE_METRICS.items()):
            summary = mine.get(metric)
            row[label] = summary.mean if summary is not None and summary.n else None
            row[f"{label}_samples"] = summary.n if summary is not None else 0
            if summary is not None and summary.n >= min_samples:
                votes[label].append(summary.mean)
        rows.append(row)
    fleet: dict[str, Any] = {}
    for label, values in votes.items():
        fleet[label] = statistics.median(values) if values else None
        fleet[f"{label}_devices"] = len(values)
    return {"devices": rows, "fleet": fleet, "members": len(members), "min_samples": min_samples}


def shadow_phase_verdict(*, rollout: Rollout, shadow: Shadow, now: datetime) -> ShadowVerdict:
    """The verdict a rollout's shadow earns now (``fleet.rollouts.shadow_gate``), on its
    per-device figures since the shadow started."""
    policy = rollout.shadow_policy
    report = shadow_report(shadow=shadow, min_samples=int(policy.get("min_samples", 1)))
    started = rollout.started_at or shadow.created_at
    verdict = judge_shadow(
        rows=report["devices"],
        policy=policy,
        task=rollout.version.family.task,
        elapsed_s=(now - started).total_seconds(),
    )
    return ShadowVerdict(verdict.outcome, verdict.reason, {"shadow": shadow.pk, **verdict.numbers})
