"""Drift reads: the latest report per device and the share of devices in alert per group."""

from __future__ import annotations

from typing import Any

from django.db.models import OuterRef, Subquery

from fleet.models import Device, DriftReport


def drift_summary(*, group_id: int | None = None) -> list[dict[str, Any]]:
    """Per group: devices with a report, how many are in alert now (by their latest report), the share."""
    latest = DriftReport.objects.filter(device=OuterRef("pk")).order_by("-window_end", "-id")
    devices = Device.objects.exclude(status="decommissioned").annotate(
        drift_alert=Subquery(latest.values("alert")[:1])
    )
    if group_id is not None:
        devices = devices.filter(groups__id=group_id)
    summary: dict[int | None, dict[str, Any]] = {}
    for device_id, alert, gid, gname in devices.values_list(
        "pk", "drift_alert", "groups__id", "groups__name"
    ):
        if group_id is not None and gid != group_id:
            continue
        entry = summary.setdefault(
            gid,
            {
                "group_id": gid,
                "group": gname,
                "devices": 0,
                "reporting": 0,
                "alerting": 0,
                "alert_devices": [],
            },
        )
        entry["devices"] += 1
        if alert is not None:
            entry["reporting"] += 1
        if alert:
            entry["alerting"] += 1
            entry["alert_devices"].append(str(device_id))
    for entry in summary.values():
        entry["alert_share"] = entry["alerting"] / entry["reporting"] if entry["reporting"] else 0.0
    return sorted(summary.values(), key=lambda e: (e["group_id"] is None, e["group_id"] or 0))
