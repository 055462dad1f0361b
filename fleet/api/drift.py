"""Drift: the device endpoint that receives sketches and the operator summary per group."""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import ServiceError, int_param
from devices_agent.wire import (
    DRIFT_CONFIDENCE_BINS,
    DRIFT_FEATURE_BINS,
    DRIFT_MAX_FEATURES,
    DRIFT_PSI_MAX_FEATURES,
)
from fleet.api.agent_views import MAX_FUTURE_SKEW, _finite, _int, _invalid, _timestamp
from fleet.auth import device_endpoint
from fleet.models import Device
from fleet.selectors.drift import drift_feature_bins, drift_latest_reports, drift_summary
from fleet.services.drift import drift_report_ingest


def sketch_validate(*, body: dict[str, Any]) -> dict[str, Any]:
    """Check a `wire.DriftSketch` (sizes, finite numbers, counts >= 0); returns the clean sketch."""
    count = _int(body.get("count"), "count")
    mean = body.get("mean")
    m2 = body.get("m2")
    if not isinstance(mean, list) or not 1 <= len(mean) <= DRIFT_MAX_FEATURES:
        raise _invalid(f"mean must be a list of 1..{DRIFT_MAX_FEATURES} numbers.", "mean")
    if not isinstance(m2, list) or len(m2) != len(mean):
        raise _invalid("m2 must be a list as long as mean.", "m2")
    clean_mean = [_finite(v, f"mean[{i}]") for i, v in enumerate(mean)]
    clean_m2 = [_finite(v, f"m2[{i}]") for i, v in enumerate(m2)]
    if any(v < 0 for v in clean_m2):
        raise _invalid("m2 must not be negative.", "m2")
    hist = body.get("confidence_hist")
    if not isinstance(hist, list) or len(hist) != DRIFT_CONFIDENCE_BINS:
        raise _invalid(f"confidence_hist must hold {DRIFT_CONFIDENCE_BINS} counts.", "confidence_hist")
    clean_hist = [_int(v, f"confidence_hist[{i}]") for i, v in enumerate(hist)]
    clean: dict[str, Any] = {
        "count": count,
        "mean": clean_mean,
        "m2": clean_m2,
        "confidence_hist": clean_hist,
    }
    feature_hist = body.get("feature_hist")
    if feature_hist is not None:
        etag = body.get("bins_etag")
        if not isinstance(etag, str) or not 1 <= len(etag) <= 64:
            raise _invalid("bins_etag must name the bins feature_hist was counted over.", "bins_etag")
        if not isinstance(feature_hist, list) or len(feature_hist) > DRIFT_PSI_MAX_FEATURES:
            raise _invalid(
                f"feature_hist must be a list of at most {DRIFT_PSI_MAX_FEATURES} lists.", "feature_hist"
            )
        rows = []
        for i, row in enumerate(feature_hist):
            if not isinstance(row, list) or not 1 <= len(row) <= DRIFT_FEATURE_BINS:
                raise _invalid(f"feature_hist[{i}] must hold 1..{DRIFT_FEATURE_BINS} counts.", "feature_hist")
            rows.append([_int(v, f"feature_hist[{i}][{j}]") for j, v in enumerate(row)])
        clean["feature_hist"] = rows
        clean["bins_etag"] = etag
    return clean


@device_endpoint()
def agent_drift(request: HttpRequest, device: Device, body: dict[str, Any]) -> dict[str, Any]:
    """`POST drift`: DriftSketch -> DriftResponse (the verdict, z, effect size, feature PSI)."""
    sketch = sketch_validate(body=body)
    version_id = body.get("version_id")
    version_id = None if version_id is None else _int(version_id, "version_id", minimum=1)
    now = timezone.now()
    end, start = body.get("window_end"), body.get("window_start")
    window_end = now if end is None else _timestamp(end, "window_end")
    window_start = None if start is None else _timestamp(start, "window_start")
    if window_end > now + MAX_FUTURE_SKEW:
        raise _invalid("window_end is in the future.", "window_end")
    if window_start is not None and window_start > window_end:
        raise _invalid("window_start must not be after window_end.", "window_start")
    report = drift_report_ingest(
        device=device, sketch=sketch, version_id=version_id, window_start=window_start, window_end=window_end
    )
    answer: dict[str, Any] = {
        "id": report.pk,
        "alert": report.alert,
        "score": report.score,
        "z_max": report.z_max,
        "effect_size": report.effect_size,
        "feature_psi": report.feature_psi,
        "psi_band": report.psi_band or None,
        "baseline_score": report.baseline_score,
        "baseline_effect_size": report.baseline_effect_size,
        "baseline_feature_psi": report.baseline_feature_psi,
    }
    # The board counts per-feature values over the reference's bins once it has them:
    # they travel when its sketch was not counted over the current ones.
    bins = drift_feature_bins(version_id=report.version_id) if report.version_id else None
    if bins is not None and sketch.get("bins_etag") != bins["etag"]:
        answer["feature_bins"] = bins
    return answer


class DriftSummaryView(APIView):
    """`GET /api/v1/drift/?group=`: per group, the share of reporting devices in drift alert."""

    @extend_schema(
        parameters=[OpenApiParameter("group", OpenApiTypes.INT, required=False)],
        responses={200: OpenApiTypes.OBJECT},
    )
    def get(self, request: Request) -> Response:
        """The drift summary, optionally for one group."""
        group_id = int_param(request.query_params, "group")
        return Response({"groups": drift_summary(group_id=group_id)})


class DriftReportsView(APIView):
    """`GET /api/v1/drift/reports/?group=&alert=`: each device's latest report with its numbers."""

    @extend_schema(
        parameters=[
            OpenApiParameter("group", OpenApiTypes.INT, required=False),
            OpenApiParameter("alert", OpenApiTypes.BOOL, required=False),
        ],
        responses={200: OpenApiTypes.OBJECT},
    )
    def get(self, request: Request) -> Response:
        """Latest report per device: alert, score, z (significance), effect size and PSI (size)."""
        raw_alert = request.query_params.get("alert")
        group_id = int_param(request.query_params, "group")
        alert: bool | None = None
        if raw_alert is not None:
            if raw_alert.lower() not in ("true", "false", "1", "0"):
                raise ServiceError("alert must be true or false.", code="validation_error")
            alert = raw_alert.lower() in ("true", "1")
        return Response({"reports": drift_latest_reports(group_id=group_id, alert=alert)})


__all__ = ["DriftReportsView", "DriftSummaryView", "agent_drift", "sketch_validate"]
