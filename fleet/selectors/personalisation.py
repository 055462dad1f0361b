"""Personalisation reads: how much each board's personal head beats the global model.

Boards report two numbers per active version, both on the same local held-out split and
on the family's primary metric: ``global_accuracy`` and ``personal_accuracy`` for a
classification family, ``global_mae`` and ``personal_mae`` for a regression one. The gain
is oriented so that positive is always better: ``personal_accuracy - global_accuracy``,
or ``global_mae - personal_mae``. Only the latest value of each per (device, version)
counts, and a device's row is its most recent version that has both numbers of its
family's metric. Rows and group means name the metric they are in; a group whose devices
run families of both tasks has one mean per metric.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet

from fleet.models import Device, MetricSample

PERSONAL_METRICS = ("global_accuracy", "personal_accuracy", "global_mae", "personal_mae")
# The primary metric of each task, and whether a larger value of it is better.
TASK_METRIC = {"classification": "accuracy", "regression": "mae"}
HIGHER_IS_BETTER = {"accuracy": True, "mae": False}


def personal_gain(*, metric: str, global_value: float, personal_value: float) -> float:
    """How much better the personal head is than the global model (positive: better)."""
    if HIGHER_IS_BETTER[metric]:
        return personal_value - global_value
    return global_value - personal_value


def _version_metrics(version_ids: set[int]) -> dict[int, str]:
    """Version id -> its family's primary metric (one query)."""
    from models_registry.models import ModelVersion

    rows = ModelVersion.objects.filter(pk__in=version_ids).values_list("pk", "family__task")
    return {pk: TASK_METRIC.get(str(task), "accuracy") for pk, task in rows}


def _personal_samples(*, group_id: int | None, group_name: str | None) -> QuerySet[MetricSample]:
    """The personal/global samples of live devices (of one group), found through the version index.

    Read by version and name (``metric_version_name_ts``) and joined to their devices, so
    the cost follows the samples of these four metrics, not the size of the fleet.
    """
    from models_registry.models import ModelVersion

    samples = MetricSample.objects.filter(
        version_id__in=ModelVersion.objects.order_by().values("pk"), name__in=PERSONAL_METRICS
    ).filter(~Q(device__status="decommissioned"))
    if group_id is not None:
        samples = samples.filter(device__groups__id=group_id)
    if group_name is not None:
        samples = samples.filter(device__groups__name=group_name)
    return samples


def _latest_pairs(samples: QuerySet[MetricSample]) -> dict[Any, dict[str, Any]]:
    """Per device: the newest version with both numbers of its metric, and their latest values."""
    rows = samples.order_by("ts", "id").values_list("device_id", "version_id", "name", "value", "ts")
    # Ascending order: a later sample for the same key overwrites an earlier one.
    latest: dict[tuple[Any, int], dict[str, Any]] = {}
    for device_id, version_id, name, value, ts in rows:
        entry = latest.setdefault((device_id, version_id), {"version_id": version_id, "ts": ts})
        entry[name] = value
        entry["ts"] = max(entry["ts"], ts)
    metrics = _version_metrics({version_id for _, version_id in latest})
    best: dict[Any, dict[str, Any]] = {}
    for (device_id, version_id), entry in latest.items():
        metric = metrics.get(version_id)
        if metric is None or f"global_{metric}" not in entry or f"personal_{metric}" not in entry:
            continue
        entry["metric"] = metric
        current = best.get(device_id)
        if current is None or entry["ts"] > current["ts"]:
            best[device_id] = entry
    return best


def personalisation_summary(*, group_id: int | None = None, group_name: str | None = None) -> dict[str, Any]:
    """Per-device rows (metric, global, personal, gain) and per-group means of the gain.

    ``group_id`` or ``group_name`` restricts both lists to the devices of that group.
    Decommissioned devices are left out. A device in several groups counts in each.
    A device row carries ``metric`` (``accuracy`` or ``mae``), ``global``, ``personal``
    and ``gain``, and the two numbers under their own names (``global_accuracy``, ...);
    a group row carries its ``metric``, ``devices`` and ``mean_gain``.

    Only devices that report these numbers are read (names and groups included), so the
    overview's panel costs nothing on the rest of the fleet.
    """
    devices = Device.objects.exclude(status="decommissioned")
    if group_id is not None:
        devices = devices.filter(groups__id=group_id)
    if group_name is not None:
        devices = devices.filter(groups__name=group_name)
    samples = _personal_samples(group_id=group_id, group_name=group_name)
    pairs = _latest_pairs(samples)
    memberships: dict[Any, list[tuple[Any, Any]]] = {}
    names: dict[Any, str] = {}
    reporting = devices.filter(pk__in=samples.order_by().values("device_id"))
    for device_id, name, gid, gname in reporting.values_list("pk", "name", "groups__id", "groups__name"):
        if group_id is not None and gid != group_id:
            continue
        if group_name is not None and gname != group_name:
            continue
        names[device_id] = name
        memberships.setdefault(device_id, []).append((gid, gname))
    pairs = {device_id: entry for device_id, entry in pairs.items() if device_id in names}
    rows: list[dict[str, Any]] = []
    groups: dict[tuple[int | None, str], dict[str, Any]] = {}
    for device_id, entry in pairs.items():
        metric = entry["metric"]
        global_value, personal_value = entry[f"global_{metric}"], entry[f"personal_{metric}"]
        gain = personal_gain(metric=metric, global_value=global_value, personal_value=personal_value)
        rows.append(
            {
                "device_id": str(device_id),
                "name": names[device_id],
                "version_id": entry["version_id"],
                "metric": metric,
                "global": global_value,
                "personal": personal_value,
                f"global_{metric}": global_value,
                f"personal_{metric}": personal_value,
                "gain": gain,
            }
        )
        for gid, gname in memberships[device_id]:  # gid is None for devices in no group
            group = groups.setdefault(
                (gid, metric), {"group_id": gid, "group": gname, "metric": metric, "devices": 0, "gains": []}
            )
            group["devices"] += 1
            group["gains"].append(gain)
    summary = []
    for group in sorted(groups.values(), key=lambda g: (g["group"] is None, g["group"] or "", g["metric"])):
        gains = group.pop("gains")
        group["mean_gain"] = sum(gains) / len(gains)
        summary.append(group)
    rows.sort(key=lambda r: (r["name"], r["device_id"]))
    return {"devices": rows, "groups": summary}


__all__ = ["PERSONAL_METRICS", "personal_gain", "personalisation_summary"]
