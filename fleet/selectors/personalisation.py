"""Personalisation reads: how much each board's personal head beats the global model.

Boards report two numbers per active version (``global_accuracy`` and
``personal_accuracy``, both on the same local held-out split); the gain is their
difference. Only the latest value of each per (device, version) counts, and a device's
row is its most recent version that has both numbers.
"""

from __future__ import annotations

from typing import Any

from fleet.models import Device, MetricSample

PERSONAL_METRICS = ("global_accuracy", "personal_accuracy")


def _latest_pairs(*, device_ids: list[Any]) -> dict[Any, dict[str, Any]]:
    """Per device: the newest version with both accuracies, and their latest values."""
    samples = (
        MetricSample.objects.filter(
            device_id__in=device_ids, name__in=PERSONAL_METRICS, version__isnull=False
        )
        .order_by("ts", "id")
        .values_list("device_id", "version_id", "name", "value", "ts")
    )
    # Ascending order: a later sample for the same key overwrites an earlier one.
    latest: dict[tuple[Any, int], dict[str, Any]] = {}
    for device_id, version_id, name, value, ts in samples:
        entry = latest.setdefault((device_id, version_id), {"version_id": version_id, "ts": ts})
        entry[name] = value
        entry["ts"] = max(entry["ts"], ts)
    best: dict[Any, dict[str, Any]] = {}
    for (device_id, _), entry in latest.items():
        if not all(name in entry for name in PERSONAL_METRICS):
            continue
        current = best.get(device_id)
        if current is None or entry["ts"] > current["ts"]:
            best[device_id] = entry
    return best


def personalisation_summary(*, group_id: int | None = None, group_name: str | None = None) -> dict[str, Any]:
    """Per-device rows (global, personal, gain) and per-group means of the gain.

    ``group_id`` or ``group_name`` restricts both lists to the devices of that group.
    Decommissioned devices are left out. A device in several groups counts in each.
    """
    devices = Device.objects.exclude(status="decommissioned")
    if group_id is not None:
        devices = devices.filter(groups__id=group_id)
    if group_name is not None:
        devices = devices.filter(groups__name=group_name)
    memberships: dict[Any, list[tuple[Any, Any]]] = {}
    names: dict[Any, str] = {}
    for device_id, name, gid, gname in devices.values_list("pk", "name", "groups__id", "groups__name"):
        if group_id is not None and gid != group_id:
            continue
        if group_name is not None and gname != group_name:
            continue
        names[device_id] = name
        memberships.setdefault(device_id, []).append((gid, gname))
    pairs = _latest_pairs(device_ids=list(names))
    rows: list[dict[str, Any]] = []
    groups: dict[int | None, dict[str, Any]] = {}
    for device_id, entry in pairs.items():
        gain = entry["personal_accuracy"] - entry["global_accuracy"]
        rows.append(
            {
                "device_id": str(device_id),
                "name": names[device_id],
                "version_id": entry["version_id"],
                "global_accuracy": entry["global_accuracy"],
                "personal_accuracy": entry["personal_accuracy"],
                "gain": gain,
            }
        )
        for gid, gname in memberships[device_id]:  # gid is None for devices in no group
            group = groups.setdefault(gid, {"group_id": gid, "group": gname, "devices": 0, "gains": []})
            group["devices"] += 1
            group["gains"].append(gain)
    summary = []
    for group in sorted(groups.values(), key=lambda g: (g["group"] is None, g["group"] or "")):
        gains = group.pop("gains")
        group["mean_gain"] = sum(gains) / len(gains)
        summary.append(group)
    rows.sort(key=lambda r: (r["name"], r["device_id"]))
    return {"devices": rows, "groups": summary}


__all__ = ["PERSONAL_METRICS", "personalisation_summary"]
