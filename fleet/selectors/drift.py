"""Drift reads: the latest report per device and the share of devices in alert per group."""

from __future__ import annotations

from typing import Any

from django.core.cache import cache
from django.db.models import Count, OuterRef, Q, Subquery

from fleet.models import Device, DriftReport


def drift_summary(*, group_id: int | None = None) -> list[dict[str, Any]]:
    """Per group: devices, those with a report, how many are in alert now (by their latest
    report, kept on the device row), the share, and which devices alert."""
    devices = Device.objects.exclude(status="decommissioned")
    if group_id is not None:
        devices = devices.filter(groups__id=group_id)
    summary: dict[int | None, dict[str, Any]] = {}
    for device_id, alert, gid, gname in devices.values_list(
        "pk", "drift_alert", "groups__id", "groups__name"
    ):
        if group_id is not None and gid != group_id:
            continue
        entry = summary.setdefault(gid, _entry(gid, gname))
        entry["devices"] += 1
        if alert is not None:
            entry["reporting"] += 1
        if alert:
            entry["alerting"] += 1
            entry["alert_devices"].append(str(device_id))
    return _shares(summary)


def drift_reporting_groups() -> list[dict[str, Any]]:
    """The groups of :func:`drift_summary` that have a reporting device, and their counts.

    Counted in SQL from the devices' latest verdicts (``Device.drift_alert``), never a
    row per device in Python, so the overview costs the same on a fleet of 100,000
    reporting boards. ``devices`` counts the reporting devices here; no device list.
    """
    rows = (
        Device.objects.exclude(status="decommissioned")
        .filter(drift_alert__isnull=False)
        .values("groups__id", "groups__name")
        .annotate(reporting=Count("pk"), alerting=Count("pk", filter=Q(drift_alert=True)))
        .order_by()
    )
    summary: dict[int | None, dict[str, Any]] = {}
    for row in rows:
        entry = _entry(row["groups__id"], row["groups__name"])
        entry.update(devices=row["reporting"], reporting=row["reporting"], alerting=row["alerting"])
        summary[row["groups__id"]] = entry
    return _shares(summary)


# Where beat's drift check leaves the counts of `drift_reporting_groups` for pages to read.
DRIFT_GROUPS_CACHE_KEY = "drift:reporting-groups"


def drift_groups_counted() -> dict[str, Any]:
    """The counts of :func:`drift_reporting_groups` as beat's drift check last left them.

    ``{"groups": [...], "at": ISO time or None}``. A count over every reporting board costs
    a join of the whole fleet (a fifth of a second at 100,000 boards), so pages read the
    one beat makes every ``DRIFT_CHECK_S``; with none there yet (or no cache) they count now.
    """
    try:
        counted = cache.get(DRIFT_GROUPS_CACHE_KEY)
    except Exception:  # noqa: BLE001 - a cache that is down costs a count, not the page
        counted = None
    if isinstance(counted, dict) and isinstance(counted.get("groups"), list):
        return counted
    return {"groups": drift_reporting_groups(), "at": None}


def _entry(group_id: int | None, name: str | None) -> dict[str, Any]:
    return {
        "group_id": group_id,
        "group": name,
        "devices": 0,
        "reporting": 0,
        "alerting": 0,
        "alert_devices": [],
    }


def _shares(summary: dict[int | None, dict[str, Any]]) -> list[dict[str, Any]]:
    for entry in summary.values():
        entry["alert_share"] = entry["alerting"] / entry["reporting"] if entry["reporting"] else 0.0
    return sorted(summary.values(), key=lambda e: (e["group_id"] is None, e["group_id"] or 0))


def drift_feature_bins(*, version_id: int) -> dict[str, Any] | None:
    """The bins a board counts per-feature values over for ``version_id`` (`wire.DriftFeatureBins`).

    None while the version has no reference, or one from before per-feature bins.
    """
    from models_registry.models import ModelVersion

    metrics = ModelVersion.objects.filter(pk=version_id).values_list("metrics", flat=True).first() or {}
    bins = (metrics.get("drift_reference") or {}).get("feature_bins")
    if not isinstance(bins, dict) or not bins.get("features"):
        return None
    return {
        "version_id": version_id,
        "etag": str(bins["etag"]),
        "features": list(bins["features"]),
        "edges": list(bins["edges"]),
    }


def drift_latest_reports(*, group_id: int | None = None, alert: bool | None = None) -> list[dict[str, Any]]:
    """Each device's latest drift report with its numbers: significance (z) and size (effect, PSI)."""
    latest = DriftReport.objects.filter(device=OuterRef("pk")).order_by("-window_end", "-id")
    devices = Device.objects.exclude(status="decommissioned").annotate(
        drift_report_id=Subquery(latest.values("pk")[:1])
    )
    if group_id is not None:
        devices = devices.filter(groups__id=group_id)
    ids = [pk for pk in devices.values_list("drift_report_id", flat=True) if pk is not None]
    reports = DriftReport.objects.filter(pk__in=ids).select_related("device").order_by("device__name", "id")
    if alert is not None:
        reports = reports.filter(alert=alert)
    return [
        {
            "id": r.pk,
            "device_id": str(r.device_id),
            "device": r.device.name,
            "version_id": r.version_id,
            "window_end": r.window_end,
            "alert": r.alert,
            "score": r.score,
            "z_max": r.z_max,
            "z_feature": r.z_feature,
            "effect_size": r.effect_size,
            "effect_feature": r.effect_feature,
            "feature_psi": r.feature_psi,
            "feature_psi_feature": r.feature_psi_feature,
            "psi_band": r.psi_band or None,
            "confidence_psi": r.psi,
            "baseline_score": r.baseline_score,
            "baseline_effect_size": r.baseline_effect_size,
            "baseline_feature_psi": r.baseline_feature_psi,
            "samples": int((r.sketch or {}).get("count", 0)),
        }
        for r in reports
    ]
