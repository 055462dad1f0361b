"""Operator API: shadow deployments (a candidate run beside the active version on devices).

``POST /api/v1/shadows/`` starts one (``fleet.services.shadows.shadow_start``),
``POST /api/v1/shadows/<id>/stop/`` stops it, and ``GET /api/v1/shadows/<id>/`` shows it
with per-device rows (agreement with the active version, accuracy or mae against
feedback, latency) and the fleet's medians over devices.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import client_ip
from fleet.models import Shadow
from fleet.selectors.shadows import shadow_list, shadow_member_count, shadow_report
from fleet.services import shadows as shadow_services


class ShadowSerializer(serializers.ModelSerializer[Shadow]):
    version_label = serializers.CharField(source="version.label", read_only=True)
    # Plain text rather than a choice field: "running" or "stopped" (no new schema enum).
    status = serializers.CharField(read_only=True, help_text="running or stopped")
    devices = serializers.SerializerMethodField()

    class Meta:
        model = Shadow
        fields = [
            "id",
            "version",
            "version_label",
            "group",
            "status",
            "sample_rate",
            "max_cpu_percent",
            "budget_ms",
            "tolerance",
            "reason",
            "created_at",
            "stopped_at",
            "devices",
        ]
        read_only_fields = fields

    def get_devices(self, obj: Shadow) -> int:
        return shadow_member_count(shadow=obj)


class ShadowDetailSerializer(ShadowSerializer):
    report = serializers.SerializerMethodField()

    class Meta(ShadowSerializer.Meta):
        fields = [*ShadowSerializer.Meta.fields, "report"]
        read_only_fields = fields

    def get_report(self, obj: Shadow) -> dict[str, Any]:
        return shadow_report(shadow=obj)


class ShadowCreateInput(serializers.Serializer[Any]):
    version = serializers.IntegerField()
    group = serializers.IntegerField(required=False, allow_null=True)
    device_ids = serializers.ListField(child=serializers.UUIDField(), required=False, max_length=1000)
    sample_rate = serializers.FloatField(min_value=0, max_value=1)
    max_cpu_percent = serializers.FloatField(
        required=False,
        allow_null=True,
        min_value=0.001,
        max_value=100,
        help_text="Shadow CPU budget, percent of one core (average latency x prediction rate x sample rate).",
    )
    budget_ms = serializers.FloatField(
        required=False,
        allow_null=True,
        min_value=0.001,
        max_value=600_000,
        help_text="Shadow time per application prediction (average latency x sample rate).",
    )
    tolerance = serializers.FloatField(
        required=False,
        min_value=0,
        max_value=1e9,
        help_text="Regression: the largest |difference| of an output that still counts as agreement.",
    )
    reason = serializers.CharField(required=False, allow_blank=True, max_length=500)


class ShadowStopInput(serializers.Serializer[Any]):
    reason = serializers.CharField(required=False, allow_blank=True, max_length=500)


class ShadowViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Any]):
    """Shadow deployments of candidate versions, with per-device figures."""

    serializer_class = ShadowSerializer
    filterset_fields = ["status", "version"]
    ordering_fields = ["created_at", "status"]

    def get_queryset(self):
        return shadow_list()

    def get_serializer_class(self):
        return ShadowDetailSerializer if self.action == "retrieve" else ShadowSerializer

    @extend_schema(request=ShadowCreateInput, responses={201: ShadowDetailSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = ShadowCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        shadow = shadow_services.shadow_start(
            actor=request.user,
            version_id=v["version"],
            group_id=v.get("group"),
            device_ids=[str(d) for d in v.get("device_ids") or []] or None,
            sample_rate=v["sample_rate"],
            max_cpu_percent=v.get("max_cpu_percent"),
            budget_ms=v.get("budget_ms"),
            tolerance=v.get("tolerance", 0.0),
            reason=v.get("reason", ""),
            remote_addr=client_ip(request),
        )
        return Response(ShadowDetailSerializer(shadow).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=ShadowStopInput, responses={200: ShadowDetailSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        """Stop shadowing: the devices drop the candidate on their next heartbeat."""
        data = ShadowStopInput(data=request.data)
        data.is_valid(raise_exception=True)
        shadow = shadow_services.shadow_stop(
            actor=request.user,
            shadow_id=int(self.get_object().pk),
            reason=data.validated_data.get("reason", ""),
            remote_addr=client_ip(request),
        )
        shadow.refresh_from_db()
        return Response(ShadowDetailSerializer(shadow).data)
