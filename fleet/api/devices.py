"""Operator API for devices, device groups, enrollment tokens and update policies.

Roles: viewers read; operators edit devices, groups and policies, queue commands,
assign versions and create or revoke enrollment tokens; decommissioning a device needs
an admin, since it cannot be undone (the device must enroll again), and so does marking
a group canary, since canary groups may be given versions in staging.
"""

from __future__ import annotations

import re
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.db.models import QuerySet
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import mixins, serializers, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import AuditedWritesMixin, IdField, PrimaryKeyRelatedField, client_ip, int_param
from core.roles import ADMIN, has_role
from fleet.agent_setup import agent_run_command
from fleet.models import (
    Deployment,
    Device,
    DeviceCommand,
    DeviceGroup,
    EnrollmentToken,
    GroupReleaseChange,
    UpdatePolicy,
)
from fleet.selectors.devices import (
    device_list,
    device_recent_deployments,
    group_members,
    group_release_changes,
)
from fleet.services.commands import COMMAND_KINDS, device_command_create
from fleet.services.devices import device_assign_version, device_decommission, device_update, tags_validate
from fleet.services.enrollment import enrollment_token_create, enrollment_token_revoke
from fleet.services.releases import group_release_set

# --- serializers -----------------------------------------------------------------------


def _version(version: Any) -> dict[str, Any] | None:
    return {"id": version.pk, "label": version.label} if version is not None else None


class DeviceSerializer(serializers.ModelSerializer):
    running_version = serializers.SerializerMethodField()
    desired_version = serializers.SerializerMethodField()
    groups = serializers.SerializerMethodField()
    policy = serializers.SerializerMethodField()

    class Meta:
        model = Device
        fields = [
            "id",
            "name",
            "status",
            "last_seen",
            "enrolled_at",
            "tags",
            "groups",
            "policy",
            "arch",
            "agent_version",
            "running_version",
            "desired_version",
            "deployment_state",
        ]

    def get_running_version(self, obj: Device) -> dict[str, Any] | None:
        return _version(obj.running_version)

    def get_desired_version(self, obj: Device) -> dict[str, Any] | None:
        return _version(obj.desired_version)

    def get_groups(self, obj: Device) -> list[int]:
        # Reads the prefetched groups: no query per device.
        return [g.pk for g in obj.groups.all()]

    def get_policy(self, obj: Device) -> dict[str, Any] | None:
        return {"id": obj.policy.pk, "name": obj.policy.name} if obj.policy is not None else None


class DeploymentSerializer(serializers.ModelSerializer):
    version = serializers.SerializerMethodField()

    class Meta:
        model = Deployment
        fields = ["id", "version", "state", "origin_type", "origin_id", "error", "created_at", "updated_at"]

    def get_version(self, obj: Deployment) -> dict[str, Any] | None:
        return _version(obj.version)


class DeviceDetailSerializer(DeviceSerializer):
    previous_version = serializers.SerializerMethodField()
    hardware = serializers.SerializerMethodField()
    recent_deployments = serializers.SerializerMethodField()

    class Meta(DeviceSerializer.Meta):
        fields = [
            *DeviceSerializer.Meta.fields,
            "previous_version",
            "hardware",
            "state",
            "decommissioned_at",
            "recent_deployments",
        ]

    def get_previous_version(self, obj: Device) -> dict[str, Any] | None:
        return _version(obj.previous_version)

    def get_hardware(self, obj: Device) -> dict[str, Any]:
        return {
            "arch": obj.arch,
            "cores": obj.cores,
            "ram_mb": obj.ram_mb,
            "accelerator": obj.accelerator,
            "os": obj.os,
            "agent_version": obj.agent_version,
            "extra": obj.hardware,
        }

    def get_recent_deployments(self, obj: Device) -> list[dict[str, Any]]:
        return list(DeploymentSerializer(device_recent_deployments(device=obj), many=True).data)


class DeviceUpdateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=150, required=False)
    tags = serializers.ListField(child=serializers.CharField(max_length=64), required=False, max_length=50)
    groups = serializers.ListField(child=IdField(), required=False, max_length=100)
    policy = IdField(required=False, allow_null=True)


class CommandInputSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=COMMAND_KINDS)
    args = serializers.DictField(required=False, default=dict)


class CommandSerializer(serializers.ModelSerializer):
    class Meta:
        model = DeviceCommand
        fields = ["id", "kind", "args", "status", "result", "created_at", "sent_at", "finished_at"]


class AssignVersionSerializer(serializers.Serializer):
    version = IdField()
    # An explicit rollback: the board may then install a version older than the one it runs.
    rollback = serializers.BooleanField(required=False, default=False)


# --- devices ---------------------------------------------------------------------------


@extend_schema(
    parameters=[
        OpenApiParameter("status", str),
        OpenApiParameter("group", str, description="Group id or name (static and tag-selected members)."),
        OpenApiParameter("tag", str),
        OpenApiParameter("version", int, description="Running version id."),
        OpenApiParameter("desired_version", int),
        OpenApiParameter("search", str, description="Name contains."),
    ]
)
class DeviceViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Devices: list with filters, detail, edit, commands, manual version assignment, decommission."""

    serializer_class = DeviceSerializer
    filter_backends: list[Any] = []
    # Raised to admin by the decommission action (RolePermission reads it).
    required_role: str | None = None
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"

    def get_queryset(self) -> QuerySet[Device]:
        params = self.request.query_params
        filters: dict[str, Any] = {k: params.get(k) for k in ("status", "group", "tag", "search")}
        # Version filters are ids: anything else is a 400, not a query.
        filters["version"] = int_param(params, "version")
        filters["desired_version"] = int_param(params, "desired_version")
        return device_list(filters=filters)

    def get_serializer_class(self) -> Any:
        return DeviceDetailSerializer if self.action != "list" else DeviceSerializer

    def get_object(self) -> Device:
        device: Device = super().get_object()
        return device

    @extend_schema(request=DeviceUpdateSerializer, responses=DeviceDetailSerializer)
    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        data = DeviceUpdateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        device = self.get_object()
        device_update(
            actor=request.user,
            device_id=device.pk,
            name=values.get("name"),
            tags=tags_validate(tags=values["tags"]) if "tags" in values else None,
            group_ids=values.get("groups"),
            set_policy="policy" in values,
            policy_id=values.get("policy"),
            remote_addr=client_ip(request),
        )
        return Response(DeviceDetailSerializer(self.get_queryset().get(pk=device.pk)).data)

    @extend_schema(request=None, responses=DeviceDetailSerializer)
    @action(detail=True, methods=["post"], required_role=ADMIN)
    def decommission(self, request: Request, pk: str | None = None) -> Response:
        device = self.get_object()
        device_decommission(actor=request.user, device_id=device.pk, remote_addr=client_ip(request))
        return Response(DeviceDetailSerializer(self.get_queryset().get(pk=device.pk)).data)

    @extend_schema(request=CommandInputSerializer, responses={201: CommandSerializer})
    @action(detail=True, methods=["post"])
    def commands(self, request: Request, pk: str | None = None) -> Response:
        data = CommandInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        command = device_command_create(
            actor=request.user,
            device=self.get_object(),
            kind=data.validated_data["kind"],
            args=data.validated_data.get("args") or {},
            remote_addr=client_ip(request),
        )
        return Response(CommandSerializer(command).data, status=201)

    @extend_schema(
        request=AssignVersionSerializer,
        responses=inline_serializer(
            "AssignVersionResult",
            {"device": DeviceDetailSerializer(), "deployment_id": serializers.IntegerField(allow_null=True)},
        ),
    )
    @action(detail=True, methods=["post"], url_path="assign-version")
    def assign_version(self, request: Request, pk: str | None = None) -> Response:
        data = AssignVersionSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        device = self.get_object()
        deployment = device_assign_version(
            actor=request.user,
            device_id=device.pk,
            version_id=data.validated_data["version"],
            rollback=data.validated_data["rollback"],
            remote_addr=client_ip(request),
        )
        return Response(
            {
                "device": DeviceDetailSerializer(self.get_queryset().get(pk=device.pk)).data,
                "deployment_id": deployment.pk if deployment else None,
            }
        )


# --- groups ----------------------------------------------------------------------------


class DeviceGroupSerializer(serializers.ModelSerializer):
    release = serializers.SerializerMethodField()

    class Meta:
        model = DeviceGroup
        fields = ["id", "name", "description", "tag_selector", "policy", "canary", "release", "created_at"]

    def get_release(self, obj: DeviceGroup) -> dict[str, Any] | None:
        """The group's release (what boards joining it get) with who set it, when and why."""
        if obj.release_version_id is None:
            return None
        return {
            "version": _version(obj.release_version),
            "set_at": obj.release_set_at,
            "set_by": obj.release_set_by,
            "reason": obj.release_reason,
        }

    def validate_tag_selector(self, value: Any) -> list[str]:
        return tags_validate(tags=value)

    def validate_canary(self, value: bool) -> bool:
        # A canary group may be given staging versions; marking one is an admin's call,
        # like promoting to production (the serializer's request context says who asks).
        current = bool(self.instance.canary) if isinstance(self.instance, DeviceGroup) else False
        request = self.context.get("request")
        if value and not current and not has_role(getattr(request, "user", None), ADMIN):
            raise PermissionDenied("Marking a group canary needs the admin role.")
        return value


class GroupReleaseInputSerializer(serializers.Serializer):
    version = serializers.IntegerField(min_value=1, allow_null=True, help_text="null clears the release")
    reason = serializers.CharField(max_length=500, required=False, default="", allow_blank=True)


class GroupReleaseChangeSerializer(serializers.ModelSerializer):
    version = serializers.SerializerMethodField()
    previous_version = serializers.SerializerMethodField()

    class Meta:
        model = GroupReleaseChange
        fields = [
            "id",
            "version",
            "previous_version",
            "origin_type",
            "origin_id",
            "actor",
            "reason",
            "created_at",
        ]

    def get_version(self, obj: GroupReleaseChange) -> dict[str, Any] | None:
        return _version(obj.version)

    def get_previous_version(self, obj: GroupReleaseChange) -> dict[str, Any] | None:
        return _version(obj.previous_version)


class DeviceGroupViewSet(AuditedWritesMixin, viewsets.ModelViewSet):
    """Device groups: static members (set on the device) plus a tag selector, and a release."""

    queryset = DeviceGroup.objects.select_related("release_version__family")
    serializer_class = DeviceGroupSerializer
    audit_name = "device_group"
    search_fields = ["name"]

    @extend_schema(responses=DeviceSerializer(many=True))
    @action(detail=True, methods=["get"])
    def devices(self, request: Request, pk: str | None = None) -> Response:
        group = self.get_object()
        members = device_list().filter(pk__in=group_members(group=group).values("pk"))
        page = self.paginate_queryset(members)
        if page is not None:
            return self.get_paginated_response(DeviceSerializer(page, many=True).data)
        return Response(DeviceSerializer(members, many=True).data)

    @extend_schema(request=GroupReleaseInputSerializer, responses=DeviceGroupSerializer)
    @action(detail=True, methods=["post"])
    def release(self, request: Request, pk: str | None = None) -> Response:
        """Set (or, with `version: null`, clear) the version boards joining the group get."""
        data = GroupReleaseInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        group = group_release_set(
            actor=request.user,
            group_id=self.get_object().pk,
            version_id=data.validated_data["version"],
            reason=data.validated_data["reason"],
            remote_addr=client_ip(request),
        )
        return Response(DeviceGroupSerializer(self.get_queryset().get(pk=group.pk)).data)

    @extend_schema(responses=GroupReleaseChangeSerializer(many=True))
    @action(detail=True, methods=["get"], url_path="release-history")
    def release_history(self, request: Request, pk: str | None = None) -> Response:
        """Every change of the group's release, newest first."""
        changes = group_release_changes(group=self.get_object())
        page = self.paginate_queryset(changes)
        if page is not None:
            return self.get_paginated_response(GroupReleaseChangeSerializer(page, many=True).data)
        return Response(GroupReleaseChangeSerializer(changes, many=True).data)


# --- enrollment tokens -----------------------------------------------------------------


class EnrollmentTokenSerializer(serializers.ModelSerializer):
    uses = serializers.IntegerField(source="use_count", read_only=True)
    status = serializers.SerializerMethodField()

    class Meta:
        model = EnrollmentToken
        fields = [
            "id",
            "name",
            "prefix",
            "group",
            "tags",
            "device_tags_allowed",
            "max_uses",
            "uses",
            "expires_at",
            "revoked_at",
            "created_at",
            "status",
        ]
        read_only_fields = ["prefix", "revoked_at", "created_at"]

    def get_status(self, obj: EnrollmentToken) -> str:
        from django.utils import timezone

        if obj.revoked_at is not None:
            return "revoked"
        if obj.expires_at <= timezone.now():
            return "expired"
        if obj.use_count >= obj.max_uses:
            return "exhausted"
        return "active"


class EnrollmentTokenCreateSerializer(serializers.Serializer):
    name = serializers.CharField(max_length=150, required=False, default="", allow_blank=True)
    group = PrimaryKeyRelatedField(queryset=DeviceGroup.objects.all(), required=False, allow_null=True)
    tags = serializers.ListField(child=serializers.CharField(max_length=64), required=False, default=list)
    device_tags_allowed = serializers.ListField(
        child=serializers.CharField(max_length=64),
        required=False,
        default=list,
        help_text="fnmatch patterns of tags a device may add for itself (e.g. profile-*)",
    )
    max_uses = serializers.IntegerField(min_value=1, max_value=100_000, default=1)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)

    def validate_tags(self, value: Any) -> list[str]:
        return tags_validate(tags=value)

    def validate_device_tags_allowed(self, value: Any) -> list[str]:
        if len(value) > 50:
            raise serializers.ValidationError("At most 50 patterns.")
        return [str(v).strip() for v in value if str(v).strip()]


class EnrollmentTokenCreatedSerializer(EnrollmentTokenSerializer):
    token = serializers.CharField(read_only=True)
    agent_command = serializers.CharField(read_only=True)

    class Meta(EnrollmentTokenSerializer.Meta):
        fields = [*EnrollmentTokenSerializer.Meta.fields, "token", "agent_command"]


class EnrollmentTokenViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet
):
    """Enrollment tokens: the token itself is shown once, in the create response."""

    queryset = EnrollmentToken.objects.select_related("group")
    serializer_class = EnrollmentTokenSerializer

    @extend_schema(request=EnrollmentTokenCreateSerializer, responses={201: EnrollmentTokenCreatedSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = EnrollmentTokenCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        values = data.validated_data
        token, secret = enrollment_token_create(
            actor=request.user,
            name=values["name"],
            group=values.get("group"),
            tags=values["tags"],
            device_tags_allowed=values["device_tags_allowed"],
            max_uses=values["max_uses"],
            expires_at=values.get("expires_at"),
            remote_addr=client_ip(request),
        )
        body = dict(EnrollmentTokenSerializer(token).data)
        body["token"] = secret
        body["agent_command"] = agent_run_command(server_url=settings.PUBLIC_BASE_URL, token=secret)
        return Response(body, status=201)

    @extend_schema(request=None, responses=EnrollmentTokenSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        token = enrollment_token_revoke(
            actor=request.user, token_id=self.get_object().pk, remote_addr=client_ip(request)
        )
        return Response(EnrollmentTokenSerializer(token).data)


# --- update policies -------------------------------------------------------------------

_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


class UpdatePolicySerializer(serializers.ModelSerializer):
    class Meta:
        model = UpdatePolicy
        fields = [
            "id",
            "name",
            "description",
            "timezone",
            "maintenance_windows",
            "training",
            "max_download_bytes",
            "download_concurrency",
            "health_latency_budget_ms",
            "heartbeat_interval_s",
            "created_at",
            "updated_at",
        ]

    def validate_timezone(self, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise serializers.ValidationError(f"{value!r} is not an IANA time zone.") from exc
        return value

    def validate_maintenance_windows(self, value: Any) -> list[dict[str, Any]]:
        if not isinstance(value, list):
            raise serializers.ValidationError("A list of {days, start, end} windows.")
        clean = []
        for index, window in enumerate(value):
            if not isinstance(window, dict) or set(window) - {"days", "start", "end"}:
                raise serializers.ValidationError(f"Window {index}: an object with days, start and end.")
            start, end = window.get("start"), window.get("end")
            if not isinstance(start, str) or not _HHMM.match(start):
                raise serializers.ValidationError(f"Window {index}: start must be HH:MM.")
            if not isinstance(end, str) or not _HHMM.match(end):
                raise serializers.ValidationError(f"Window {index}: end must be HH:MM.")
            if start == end:
                raise serializers.ValidationError(f"Window {index}: start and end must differ.")
            days = window.get("days", list(range(7)))
            if (
                not isinstance(days, list)
                or not days
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 6 for d in days)
            ):
                raise serializers.ValidationError(f"Window {index}: days must list integers 0 (Monday)..6.")
            clean.append({"days": sorted(set(days)), "start": start, "end": end})
        return clean

    def validate_training(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise serializers.ValidationError(
                "An object of booleans: allowed, require_charging, require_idle."
            )
        known = {"allowed", "require_charging", "require_idle", "min_battery_percent", "min_examples"}
        unknown = set(value) - known
        if unknown:
            raise serializers.ValidationError(f"Unknown training keys: {', '.join(sorted(unknown))}.")
        return value

    def validate_max_download_bytes(self, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise serializers.ValidationError("Must be >= 0.")
        return value

    def validate_health_latency_budget_ms(self, value: float) -> float:
        if value < 0:
            raise serializers.ValidationError("Must be >= 0.")
        return value

    def validate_heartbeat_interval_s(self, value: int | None) -> int | None:
        if value is not None and not 5 <= value <= 86_400:
            raise serializers.ValidationError("Must be 5..86400 seconds.")
        return value


class UpdatePolicyViewSet(AuditedWritesMixin, viewsets.ModelViewSet):
    """Update policies: maintenance windows in a time zone, download and training rules."""

    queryset = UpdatePolicy.objects.all()
    serializer_class = UpdatePolicySerializer
    audit_name = "update_policy"
    search_fields = ["name"]


__all__ = ["DeviceGroupViewSet", "DeviceViewSet", "EnrollmentTokenViewSet", "UpdatePolicyViewSet"]
