"""Reads for rollouts: who is in a target, and the per-device metric figures gates judge."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import numpy as np
from django.db import connection
from django.db.models import Aggregate, Count, FloatField, Q, QuerySet, Sum

from fleet.models import Device, DeviceGroup, MetricSample, Rollout, RolloutDecision, RolloutDevice
from fleet.rollouts.gates import RAW_METRICS, DeviceSummary
from fleet.selectors.devices import group_q, tag_q


def target_devices(
    *, group: DeviceGroup | None, tags: Iterable[str] = (), device_ids: Iterable[str] = ()
) -> QuerySet[Device]:
    """Devices a rollout target names: the union of a group's members, the devices carrying
    all `tags`, and explicit ids; decommissioned devices are never targeted."""
    condition = Q(pk__in=[])
    if group is not None:
        condition |= group_q(group)
    tag_list = [str(t) for t in tags if t]
    if tag_list:
        tagged = Q()
        for tag in tag_list:
            tagged &= tag_q(tag)
        condition |= tagged
    ids = [str(d) for d in device_ids]
    if ids:
        condition |= Q(pk__in=ids)
    return Device.objects.filter(condition).exclude(status=Device.Status.DECOMMISSIONED)


def rollout_target_ids(*, rollout: Rollout) -> list[str]:
    """The ids (strings) of the devices currently in a rollout's target."""
    qs = target_devices(
        group=rollout.target_group, tags=rollout.target_tags or [], device_ids=rollout.target_device_ids or []
    )
    return [str(pk) for pk in qs.values_list("pk", flat=True)]


def devices_in_active_rollouts(*, exclude_rollout_id: int | None = None) -> dict[str, int]:
    """Device id -> id of the running or paused rollout that holds it.

    A device is held by a running/paused rollout when it is in that rollout's target, so
    drafts can be checked before any device was touched.
    """
    held: dict[str, int] = {}
    active = Rollout.objects.filter(status__in=Rollout.ACTIVE_STATUSES).select_related("target_group")
    if exclude_rollout_id is not None:
        active = active.exclude(pk=exclude_rollout_id)
    for other in active.order_by("id"):
        for device_id in rollout_target_ids(rollout=other):
            held.setdefault(device_id, other.pk)
    return held


class _Percentile95(Aggregate):
    """PostgreSQL's continuous 95th percentile (linear interpolation, as numpy's default)."""

    function = "PERCENTILE_CONT"
    template = "%(function)s(0.95) WITHIN GROUP (ORDER BY %(expressions)s)"
    output_field = FloatField()


def device_metric_stats(
    *,
    version_ids: Iterable[int],
    since: datetime,
    until: datetime,
    devices: Any = None,
    names: Iterable[str] | None = None,
    p95_of: Iterable[str] = (),
) -> dict[str, dict[str, DeviceSummary]]:
    """Per device and metric name, what the devices reported for the versions in
    since <= ts < until: count, sum, and for the names in ``p95_of`` the 95th percentile.

    ``devices`` limits the devices (ids, or a queryset of device ids to use as a subquery).
    Aggregated in SQL (GROUP BY device, name): one query, plus on databases without a
    percentile aggregate (SQLite) one more reading the ``p95_of`` values, whatever the
    number of devices and samples.
    """
    wanted = list(names) if names is not None else sorted({n for raw in RAW_METRICS.values() for n in raw})
    percentiles = [n for n in p95_of if n in wanted]
    qs = MetricSample.objects.filter(
        version_id__in=list(version_ids), name__in=wanted, ts__gte=since, ts__lt=until
    )
    if devices is not None:
        qs = qs.filter(device_id__in=devices if isinstance(devices, QuerySet) else list(devices))
    in_sql = connection.vendor == "postgresql"
    rows = qs.values("device_id", "name").annotate(n=Count("id"), total=Sum("value")).order_by()
    if in_sql and percentiles:
        rows = rows.annotate(p95=_Percentile95("value", filter=Q(name__in=percentiles)))
    out: dict[str, dict[str, DeviceSummary]] = {}
    for row in rows:
        p95 = row.get("p95") if row["name"] in percentiles else None
        out.setdefault(str(row["device_id"]), {})[row["name"]] = DeviceSummary(
            n=int(row["n"]), total=float(row["total"] or 0.0), p95=None if p95 is None else float(p95)
        )
    if percentiles and not in_sql:
        for (device_id, name), p95 in _percentiles_in_python(qs.filter(name__in=percentiles)).items():
            found = out.get(device_id, {}).get(name)
            if found is not None:
                out[device_id][name] = DeviceSummary(n=found.n, total=found.total, p95=p95)
    return out


def _percentiles_in_python(qs: QuerySet[MetricSample]) -> dict[tuple[str, str], float]:
    """(device id, name) -> 95th percentile of the values, read in one query."""
    rows = list(qs.values_list("device_id", "name", "value").order_by().iterator(chunk_size=5000))
    if not rows:
        return {}
    keys = np.array([f"{d}|{n}" for d, n, _ in rows])
    values = np.fromiter((v for _, _, v in rows), dtype=np.float64, count=len(rows))
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    unique, starts = np.unique(keys, return_index=True)
    bounds = list(starts[1:]) + [len(keys)]
    out: dict[tuple[str, str], float] = {}
    for key, lo, hi in zip(unique, starts, bounds, strict=True):
        device_id, name = str(key).split("|", 1)
        out[(device_id, name)] = float(np.percentile(values[lo:hi], 95))
    return out


def rollout_list() -> QuerySet[Rollout]:
    """Rollouts with their version and target group joined."""
    return Rollout.objects.select_related("version__family", "target_group")


def rollout_member_counts(*, rollout: Rollout) -> dict[str, int]:
    """How many members are in each state."""
    rows = RolloutDevice.objects.filter(rollout=rollout).values("state").annotate(n=Count("id"))
    counts = {state: 0 for state in RolloutDevice.State.values}
    for row in rows:
        counts[row["state"]] = row["n"]
    return counts


def rollout_exposed_count(*, rollout: Rollout) -> int:
    """Devices that ever reported the rollout's version active."""
    return RolloutDevice.objects.filter(rollout=rollout, ever_active=True).count()


def rollout_decisions(*, rollout: Rollout) -> QuerySet[RolloutDecision]:
    return RolloutDecision.objects.filter(rollout=rollout).order_by("created_at", "id")


def rollout_members(*, rollout: Rollout) -> QuerySet[RolloutDevice]:
    return RolloutDevice.objects.filter(rollout=rollout).select_related("device").order_by("wave", "id")


def rollout_summary(*, rollout: Rollout) -> dict[str, Any]:
    """Counts the API and the dashboard show next to a rollout."""
    counts = rollout_member_counts(rollout=rollout)
    return {
        "members": sum(counts.values()),
        "states": counts,
        "ever_active": rollout_exposed_count(rollout=rollout),
        "waves": len(rollout.waves or []),
    }
