"""`GET /api/v1/models/<id>/recommend/`: the variant of a family to run on a kind of board.

The registry ranks a family's evaluated variants by latency and accuracy; what boards of a
hardware profile measured on themselves is fleet data. The view lives here, in the fleet
app (which sits above the registry), and hands the fleet's measurements to the registry's
selector, so the registry never reads fleet rows.
"""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import ConflictError, NotFoundError, ServiceError
from fleet.models import Device
from fleet.selectors import hardware
from models_registry import selectors as registry
from models_registry.api import serializers as s


class FamilyRecommendApi(APIView):
    """The smallest variant within a latency budget (p50, batch 1) and an accuracy drop."""

    @extend_schema(parameters=[s.ModelRecommendQuery], responses=s.ModelRecommendOutput, tags=["models"])
    def get(self, request: Request, pk: int) -> Response:
        """The smallest variant within a latency budget (p50, batch 1) and an accuracy drop.

        With ``device`` or ``profile`` (``arch:cores:accelerator``), a variant's latency is
        the on-device median reported by boards of that hardware profile over the last 24
        hours when at least ``min_samples`` samples exist, else the server measurement;
        each variant says which (``latency_source``) and how many samples there were.
        """
        family = registry.family_get(family_id=pk)
        if family is None:
            raise NotFoundError("No such model family.", code="not_found")
        query = s.ModelRecommendQuery(data=request.query_params)
        query.is_valid(raise_exception=True)
        q = query.validated_data
        profile = None
        if q["device"] is not None:
            device = Device.objects.filter(pk=q["device"]).first()
            if device is None:
                raise NotFoundError(f"No device {q['device']}.", code="device_not_found")
            profile = hardware.device_profile(device=device)
        elif q["profile"]:
            try:
                profile = hardware.parse_profile(text=q["profile"])
            except ValueError as exc:
                raise ServiceError(str(exc), code="invalid_profile") from None
        fleet_latency = None
        if profile is not None:
            version_ids = family.versions.values_list("pk", flat=True)
            fleet_latency = hardware.profile_latency_p50(profile=profile, version_ids=version_ids)
        try:
            body = registry.family_recommend(
                family,
                latency_budget_us=q["latency_budget_us"],
                max_accuracy_drop=q["max_accuracy_drop"],
                min_accuracy=q["min_accuracy"],
                base_version_id=q["base"],
                fleet_latency=fleet_latency,
                min_samples=q["min_samples"],
            )
        except ValueError as exc:
            raise ConflictError(str(exc), code="no_base_version") from None
        body["profile"] = profile.label() if profile is not None else None
        return Response(body)


__all__ = ["FamilyRecommendApi"]
