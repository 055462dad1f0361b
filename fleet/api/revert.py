"""Operator API: revert a version everywhere, a family's policy, and decisions about versions.

``POST /api/v1/model-versions/<id>/revert/`` and ``models/<id>/policy/`` are registry
routes served here, because what they do is fleet work (like ``models/<id>/recommend/``):
the registry never reads or writes fleet rows.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.generics import ListAPIView
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import NotFoundError, client_ip, int_param
from fleet.models import FamilyPolicy, VersionDecision
from fleet.selectors.revert import family_policy, version_decisions
from fleet.services.revert import family_policy_set as policy_set
from fleet.services.revert import version_revert
from models_registry import selectors as registry


class VersionDecisionSerializer(serializers.ModelSerializer[VersionDecision]):
    class Meta:
        model = VersionDecision
        fields = [
            "id",
            "version",
            "family",
            "action",
            "trigger",
            "reason",
            "metrics",
            "devices_reverted",
            "devices_without_previous",
            "detail",
            "job_id",
            "actor",
            "created_at",
        ]
        read_only_fields = fields


class RevertInput(serializers.Serializer[Any]):
    reason = serializers.CharField(required=False, allow_blank=True, max_length=500)


class VersionRevertApi(APIView):
    """Revert a version on every device running or desiring it (operator)."""

    @extend_schema(request=RevertInput, responses={200: VersionDecisionSerializer}, tags=["models"])
    def post(self, request: Request, pk: int) -> Response:
        """Rollback deployments to each device's previous version (or its group's previous
        release); the decision says how many devices went back and how many had nothing to
        go back to. A version nobody runs gives a decision with zero devices."""
        data = RevertInput(data=request.data if isinstance(request.data, dict) else {})
        data.is_valid(raise_exception=True)
        decision = version_revert(
            version_id=pk,
            actor=request.user,
            reason=data.validated_data.get("reason", ""),
            remote_addr=client_ip(request),
        )
        return Response(VersionDecisionSerializer(decision).data, status=status.HTTP_200_OK)


class FamilyPolicyOutput(serializers.Serializer[Any]):
    family = serializers.IntegerField()
    on_failure = serializers.ChoiceField(choices=FamilyPolicy.OnFailure.choices)
    watch_s = serializers.IntegerField()
    drift_job = serializers.BooleanField()
    drift_job_interval_s = serializers.IntegerField()
    auto_ship = serializers.BooleanField(help_text="Stored and shown; nothing acts on it yet.")
    stored = serializers.BooleanField(help_text="False: no policy row, every value is a default.")


class FamilyPolicyInput(serializers.Serializer[Any]):
    on_failure = serializers.ChoiceField(choices=FamilyPolicy.OnFailure.choices, required=False)
    watch_s = serializers.IntegerField(required=False, allow_null=True, min_value=0)
    drift_job = serializers.BooleanField(required=False)
    drift_job_interval_s = serializers.IntegerField(required=False, allow_null=True, min_value=0)
    auto_ship = serializers.BooleanField(required=False)


class FamilyPolicyApi(APIView):
    """A family's policy for bad versions (alert or revert, the watch) and for drift jobs."""

    def _family(self, pk: int) -> Any:
        family = registry.family_get(family_id=pk)
        if family is None:
            raise NotFoundError("No such model family.", code="not_found")
        return family

    @extend_schema(responses={200: FamilyPolicyOutput}, tags=["models"])
    def get(self, request: Request, pk: int) -> Response:
        family = self._family(pk)
        return Response(family_policy(family_id=family.pk).as_dict())

    @extend_schema(request=FamilyPolicyInput, responses={200: FamilyPolicyOutput}, tags=["models"])
    def put(self, request: Request, pk: int) -> Response:
        """Change the fields given; null ``watch_s`` / ``drift_job_interval_s`` take the defaults."""
        family = self._family(pk)
        data = FamilyPolicyInput(data=request.data)
        data.is_valid(raise_exception=True)
        policy_set(
            family_id=family.pk,
            actor=request.user,
            data=dict(data.validated_data),
            remote_addr=client_ip(request),
        )
        return Response(family_policy(family_id=family.pk).as_dict())


class VersionDecisionListApi(ListAPIView[VersionDecision]):
    """Decisions about versions (reverts, alerts, drift-started jobs), newest first."""

    serializer_class = VersionDecisionSerializer

    def get_queryset(self) -> Any:
        params = self.request.query_params
        return version_decisions(
            version_id=int_param(params, "version"), family_id=int_param(params, "family")
        )

    @extend_schema(
        parameters=[
            OpenApiParameter("version", OpenApiTypes.INT, required=False),
            OpenApiParameter("family", OpenApiTypes.INT, required=False),
        ],
        tags=["models"],
    )
    def get(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return super().get(request, *args, **kwargs)
