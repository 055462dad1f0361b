"""Page data for the dashboard: a few queries per page, however large the fleet.

Reads go through the apps' selectors where they exist; what is only a view of the data
(counts for cards, chart series, the latest alerts) is assembled here.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.db import connection
from django.db.models import Avg, Count, Exists, IntegerField, OuterRef, QuerySet
from django.db.models.expressions import RawSQL
from django.utils.dateparse import parse_datetime

from fleet.models import Deployment, Device, DeviceCommand, DeviceGroup, MetricSample
from frontend.charts import downsample, line_spec
from models_registry.models import ModelVersion

UPDATING_STATES = ("pending", "downloading", "verifying", "installing", "health_check")
FAILED_STATES = ("failed", "rolled_back")

# Metric charts on the device page: (title, series names, y axis label)
DEVICE_CHARTS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("Inference latency", ("latency_ms",), "ms"),
    ("Accuracy on labelled feedback", ("correct", "personal_accuracy", "global_accuracy"), "accuracy"),
    ("Error on labelled feedback", ("abs_error", "personal_mae", "global_mae"), "absolute error"),
    ("Confidence", ("confidence",), "top-1 probability"),
    ("Resource use", ("cpu_percent", "ram_mb"), "cpu % / RAM MB"),
)
# State keys the device page shows as its learning facts rather than in the raw list.
LEARNING_STATE_KEYS = ("local_examples", "holdout_examples", "training_backends")
CHART_BUCKETS = 120
CHART_WINDOW = timedelta(hours=24)
# Without SQL bucketing (databases other than SQLite and PostgreSQL), a chart averages at
# most this many of the newest rows in Python.
CHART_ROW_CAP = 20_000


# (status, deployment_state, running_version_id) -> devices
Tally = dict[tuple[str, str, int | None], int]


def device_tally() -> Tally:
    """Devices per (status, update state, running version): one grouped read of the devices.

    Every figure the overview shows about the fleet comes from this one read (a few dozen
    rows however large the fleet), where one aggregate per figure would read the devices
    once each.
    """
    rows = (
        Device.objects.order_by()
        .values_list("status", "deployment_state", "running_version_id")
        .annotate(n=Count("*"))
        .values_list("status", "deployment_state", "running_version_id", "n")
    )
    return {(status, state, version): n for status, state, version, n in rows}


def fleet_counts(*, tally: Tally | None = None) -> dict[str, int]:
    """Devices by status and by update state, decommissioned devices in neither update count."""
    tally = device_tally() if tally is None else tally
    by_status: dict[str, int] = {}
    by_state: dict[str, int] = {}
    for (status, state, _), n in tally.items():
        by_status[status] = by_status.get(status, 0) + n
        if status != Device.Status.DECOMMISSIONED:
            by_state[state] = by_state.get(state, 0) + n
    decommissioned = by_status.get(Device.Status.DECOMMISSIONED, 0)
    return {
        "total": sum(by_status.values()) - decommissioned,
        "online": by_status.get(Device.Status.ONLINE, 0),
        "offline": by_status.get(Device.Status.OFFLINE, 0),
        "pending": by_status.get(Device.Status.PENDING, 0),
        "decommissioned": decommissioned,
        "updating": sum(by_state.get(state, 0) for state in UPDATING_STATES),
        "failed": sum(by_state.get(state, 0) for state in FAILED_STATES),
    }


def fleet_versions(*, limit: int = 10, tally: Tally | None = None) -> list[dict[str, Any]]:
    """The model versions devices in service run, most common first (one more query)."""
    tally = device_tally() if tally is None else tally
    counts: dict[int | None, int] = {}
    for (status, _, version), n in tally.items():
        if status != Device.Status.DECOMMISSIONED:
            counts[version] = counts.get(version, 0) + n
    rows = sorted(counts.items(), key=lambda item: (-item[1], item[0] is None, item[0] or 0))[:limit]
    ids = [pk for pk, _ in rows if pk]
    versions = ModelVersion.objects.select_related("family").in_bulk(ids)
    return [{"version": versions.get(pk), "devices": n} for pk, n in rows]


def recent_failures(*, limit: int = 8) -> QuerySet[Deployment]:
    """The latest failed or rolled-back deployments: the fleet's alerts."""
    return (
        Deployment.objects.filter(state__in=FAILED_STATES)
        .select_related("device", "version__family")
        .order_by("-updated_at", "-id")[:limit]
    )


def device_filter_choices() -> dict[str, Any]:
    """What the device filters offer: groups and the versions in use (two queries)."""
    return {
        "groups": list(DeviceGroup.objects.order_by("name").values("id", "name")),
        "versions": versions_in_use(),
        "statuses": Device.Status.values,
    }


def versions_in_use() -> list[ModelVersion]:
    """Versions some device runs (one query: per version, one probe of the foreign key's
    index, where a distinct over the devices would read every device)."""
    running = Device.objects.filter(running_version_id=OuterRef("pk"))
    return list(
        ModelVersion.objects.filter(Exists(running))
        .select_related("family")
        .order_by("family__name", "-number")
    )


def device_detail(*, device_id: Any) -> Device | None:
    """One device with its versions and policy joined."""
    return (
        Device.objects.select_related(
            "running_version__family", "desired_version__family", "previous_version__family", "policy"
        )
        .prefetch_related("groups")
        .filter(pk=device_id)
        .first()
    )


def device_deployments(*, device: Device, limit: int = 15) -> list[Deployment]:
    """The device's latest deployments with their reported states (two queries)."""
    return list(
        Deployment.objects.filter(device=device)
        .select_related("version__family")
        .prefetch_related("events")
        .order_by("-created_at", "-id")[:limit]
    )


def device_commands(*, device: Device, limit: int = 15) -> QuerySet[DeviceCommand]:
    return DeviceCommand.objects.filter(device=device).select_related("created_by").order_by("-id")[:limit]


# The index of the `width`-second slot after `start` (epoch seconds) a sample falls in,
# computed by the database so a chart over a chatty device's day reads ~120 rows per series
# instead of every sample. Samples are never before `start` here, so SQLite's truncating
# CAST is the floor. The column is unqualified: the grouped query reads one table.
_SLOT_SQL = {
    "sqlite": "CAST(((julianday(ts) - 2440587.5) * 86400.0 - %s) / %s AS INTEGER)",
    "postgresql": "CAST(FLOOR((EXTRACT(EPOCH FROM ts) - %s) / %s) AS INTEGER)",
}


def _slot_expression(*, start: float, width: float) -> RawSQL:
    # The SQL is a constant per vendor; start and width are passed as parameters.
    return RawSQL(_SLOT_SQL[connection.vendor], (start, width), output_field=IntegerField())  # noqa: S611


def device_metric_charts(*, device: Device) -> list[dict[str, Any]]:
    """Chart specs for the device page: the last day of its metrics, averaged into slots.

    The window ends at the newest sample rather than now, so a device that went quiet still
    shows its last day of data. Averaging happens in the database (one grouped query).
    """
    names = sorted({n for _, series, _ in DEVICE_CHARTS for n in series})
    newest = MetricSample.objects.filter(device=device).order_by("-ts").values_list("ts", flat=True).first()
    if newest is None:
        return []
    start = newest - CHART_WINDOW
    width = CHART_WINDOW.total_seconds() / CHART_BUCKETS
    slots: dict[str, dict[int, float]] = {}
    counts: dict[str, int] = {}
    for name, slot, mean, n in _bucketed(device=device, names=names, start=start, width=width):
        index = min(max(int(slot), 0), CHART_BUCKETS - 1)
        slots.setdefault(name, {})[index] = mean
        counts[name] = counts.get(name, 0) + n
    charts = []
    for title, series_names, y_label in DEVICE_CHARTS:
        present = [n for n in series_names if slots.get(n)]
        if not present:
            continue
        keys = sorted({k for n in present for k in slots[n]})
        labels = [(start + timedelta(seconds=k * width)).strftime("%H:%M") for k in keys]
        series = [
            {
                "label": n,
                "data": [round(slots[n][k], 4) if k in slots[n] else None for k in keys],
                "axis": "y2" if n == "ram_mb" else "y",
            }
            for n in present
        ]
        spec = line_spec(labels=labels, series=series, y_label=y_label)
        if "ram_mb" in present and len(present) > 1:
            spec["y_label"] = "cpu %"
            spec["y2_label"] = "RAM MB"
        charts.append({"title": title, "spec": spec, "samples": sum(counts[n] for n in present)})
    return charts


def _bucketed(
    *, device: Device, names: list[str], start: Any, width: float
) -> list[tuple[str, int, float, int]]:
    """(name, slot, mean, count) for the device's samples since `start`."""
    rows = MetricSample.objects.filter(device=device, name__in=names, ts__gte=start)
    if connection.vendor in ("sqlite", "postgresql"):
        grouped = (
            rows.annotate(slot=_slot_expression(start=start.timestamp(), width=width))
            .values("name", "slot")
            .annotate(mean=Avg("value"), n=Count("pk"))
            .order_by()
        )
        return [(r["name"], r["slot"], r["mean"], r["n"]) for r in grouped]
    # Other databases: average in Python over the newest rows.
    out: list[tuple[str, int, float, int]] = []
    by_name: dict[str, list[tuple[Any, float]]] = {}
    for name, ts, value in rows.order_by("-ts").values_list("name", "ts", "value")[:CHART_ROW_CAP]:
        by_name.setdefault(name, []).append((ts, value))
    for name, points in by_name.items():
        for bucket in downsample(points, buckets=CHART_BUCKETS):
            out.append((name, int((bucket.start - start).total_seconds() / width), bucket.mean, bucket.count))
    return out


def active_jobs(*, limit: int = 8) -> list[dict[str, Any]]:
    """Federated jobs that are running or paused, newest first, with their best primary metric."""
    from frontend.selectors_training import job_rows
    from training.models import FederatedJob

    return job_rows(
        list(
            FederatedJob.objects.filter(status__in=[FederatedJob.Status.RUNNING, FederatedJob.Status.PAUSED])
            .select_related("family", "target_group")
            .order_by("-id")[:limit]
        )
    )


def flagged_versions(*, limit: int = 8) -> list[dict[str, Any]]:
    """Versions flagged for drift on feedback (accuracy dropped, mae rose), newest first.

    Each row names the metric and has its live ``value`` and evaluated ``reference``
    (flags from before the metric was named are accuracy flags).
    """
    versions = list(
        ModelVersion.objects.filter(metrics__has_key="flagged")
        .select_related("family")
        .order_by("-id")[:limit]
    )
    rows = []
    outcome = _version_outcomes([v.pk for v in versions])
    for v in versions:
        flag = v.metrics["flagged"] if isinstance(v.metrics.get("flagged"), dict) else {}
        metric = flag.get("metric") or "accuracy"
        rows.append(
            {
                "version": v,
                **flag,
                "metric": metric,
                "value": flag.get("value", flag.get(metric)),
                "reference": flag.get("reference", flag.get(f"reference_{metric}")),
                "retrain_job": outcome.get(v.pk, {}).get("job"),
                "outcome": outcome.get(v.pk, {}).get("text", ""),
            }
        )
    return rows


def _version_outcomes(version_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Per version, what the fleet did about it (its newest revert or alert, and a job
    started by drift): one query."""
    from fleet.selectors.revert import version_decisions

    found: dict[int, dict[str, Any]] = {}
    for d in version_decisions().filter(version_id__in=version_ids):
        row = found.setdefault(int(d.version_id), {})
        if d.action == "drift_job_started" and "job" not in row:
            row["job"] = d.job_id
        elif d.action == "reverted" and "text" not in row:
            row["text"] = f"reverted on {d.devices_reverted} ({d.devices_without_previous} with none before)"
        elif d.action == "alerted" and "text" not in row:
            row["text"] = f"revert recommended ({d.detail.get('devices', 0)} devices)"
    return found


def overview_drift() -> dict[str, Any]:
    """The overview's drift and personalisation panels: per group, a constant number of queries."""
    from fleet.selectors.drift import drift_groups_counted
    from fleet.selectors.personalisation import personalisation_summary

    counted = drift_groups_counted()
    return {
        "drift_groups": counted["groups"],
        "drift_counted_at": parse_datetime(counted["at"]) if counted["at"] else None,
        "flagged": flagged_versions(),
        "personal_groups": personalisation_summary()["groups"],
    }


def device_drift(*, device: Device) -> dict[str, Any]:
    """The device's latest drift report and its latest personal vs global primary metric.

    The metric is the one of the family the device runs (accuracy, or mae); the gain is
    positive when the personal head is better.
    """
    from fleet.models import DriftReport
    from fleet.selectors.personalisation import personal_gain

    report = DriftReport.objects.filter(device=device).order_by("-window_end", "-id").first()
    running = device.running_version
    metric = "mae" if running is not None and running.family.task == "regression" else "accuracy"
    personal = (
        MetricSample.objects.filter(device=device, name=f"personal_{metric}", version__isnull=False)
        .order_by("-ts", "-id")
        .first()
    )
    pair = None
    if personal is not None:
        # Both numbers are measured on the same held-out split for the same version.
        global_value = (
            MetricSample.objects.filter(
                device=device, name=f"global_{metric}", version_id=personal.version_id
            )
            .order_by("-ts", "-id")
            .values_list("value", flat=True)
            .first()
        )
        if global_value is not None:
            pair = {
                "version_id": personal.version_id,
                "metric": metric,
                "personal": personal.value,
                "global": global_value,
                "gain": personal_gain(
                    metric=metric, global_value=global_value, personal_value=personal.value
                ),
            }
    return {"drift_report": report, "personal": pair}


def device_learning(*, device: Device) -> dict[str, Any]:
    """What a board holds to learn from and what it can train with, as it last reported.

    ``state.local_examples`` / ``state.holdout_examples`` (labelled examples it trains on
    and the fixed holdout it evaluates on), the training backends from ``state`` or, for
    boards that report them only at enrollment, from ``hardware``.
    """
    state = device.state if isinstance(device.state, dict) else {}
    hardware = device.hardware if isinstance(device.hardware, dict) else {}
    backends = state.get("training_backends")
    if not isinstance(backends, list):
        backends = hardware.get("training_backends")
    return {
        "local_examples": state.get("local_examples"),
        "holdout_examples": state.get("holdout_examples"),
        "training_backends": [str(b) for b in backends] if isinstance(backends, list) else None,
        "python": hardware.get("python"),
        "other_state": {k: v for k, v in state.items() if k not in LEARNING_STATE_KEYS},
    }


def overview_data() -> dict[str, Any]:
    """Everything the overview shows, in a fixed number of queries."""
    from frontend import selectors_rollouts

    tally = device_tally()
    return {
        "counts": fleet_counts(tally=tally),
        "versions": fleet_versions(tally=tally),
        "failures": list(recent_failures()),
        "jobs": active_jobs(),
        "rollouts": selectors_rollouts.active_rollouts(),
        "experiments": selectors_rollouts.active_experiments(),
        "decisions": selectors_rollouts.recent_decisions(),
        **overview_drift(),
    }


def group_detail(*, group_id: int) -> dict[str, Any] | None:
    """A group with its release, the release's history, its member count, and the versions
    its release may be set to (production, and staging for a canary group)."""
    from fleet.selectors.devices import group_members, group_release_changes
    from fleet.services.stages import allowed_stages

    group = (
        DeviceGroup.objects.select_related("policy", "release_version__family").filter(pk=group_id).first()
    )
    if group is None:
        return None
    choices = (
        ModelVersion.objects.filter(stage__in=allowed_stages(canary=group.canary))
        .select_related("family")
        .order_by("family__name", "-number")[:200]
    )
    return {
        "group": group,
        "members": group_members(group=group).count(),
        "changes": list(group_release_changes(group=group)[:50]),
        "version_choices": [v for v in choices if not (v.metrics or {}).get("rejected")],
    }
