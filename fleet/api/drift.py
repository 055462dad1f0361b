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

from core.api import int_param
from devices_agent.wire import DRIFT_CONFIDENCE_BINS, DRIFT_MAX_FEATURES
from fleet.api.agent_views import MAX_FUTURE_SKEW, _finite, _int, _invalid, _timestamp
from fleet.auth import device_endpoint
from fleet.models import Device
from fleet.selectors.drift import drift_summary
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
    return {"count": count, "mean": clean_mean, "m2": clean_m2, "confidence_hist": clean_hist}


@device_endpoint()
def agent_drift(request: HttpRequest, device: Device, body: dict[str, Any]) -> dict[str, Any]:
    """`POST drift`: DriftSketch -> {"id", "alert", "score"}."""
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
    return {"id": report.pk, "alert": report.alert, "score": report.score}


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


__all__ = ["DriftSummaryView", "agent_drift", "sketch_validate"]
