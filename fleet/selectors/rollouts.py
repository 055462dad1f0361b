"""Reads for rollouts: who is in a target, and the metric samples gates are judged on."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from django.db.models import Count, Q, QuerySet

from fleet.models import Device, DeviceGroup, MetricSample, Rollout, RolloutDecision, RolloutDevice
from fleet.rollouts.gates import RAW_METRICS
from fleet.selectors.devices import group_members, tag_q


def target_devices(
    *, group: DeviceGroup | None, tags: Iterable[str] = (), device_ids: Iterable[str] = ()
) -> QuerySet[Device]:
    """Devices a rollout target names: the union of a group's members, the devices carrying
    all `tags`, and explicit ids; decommissioned devices are never targeted."""
    condition = Q(pk__in=[])
    if group is not None:
        condition |= Q(pk__in=group_members(group=group).values("pk"))
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


def metric_arrays(
    *,
    version_ids: Iterable[int],
    since: datetime,
    until: datetime,
    device_ids: Iterable[str] | None = None,
    names: Iterable[str] | None = None,
) -> dict[str, npt.NDArray[np.float64]]:
    """Metric values by name for the given versions (and devices) with since <= ts < until."""
    wanted = list(names) if names is not None else sorted({n for raw in RAW_METRICS.values() for n in raw})
    qs = MetricSample.objects.filter(
        version_id__in=list(version_ids), name__in=wanted, ts__gte=since, ts__lt=until
    )
    if device_ids is not None:
        qs = qs.filter(device_id__in=list(device_ids))
    values: dict[str, list[float]] = {name: [] for name in wanted}
    for name, value in qs.values_list("name", "value").iterator(chunk_size=5000):
        values[name].append(value)
    return {name: np.asarray(v, dtype=np.float64) for name, v in values.items()}


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
