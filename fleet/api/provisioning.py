"""Operator API: provisioning jobs and accepted SSH host keys.

Operators create, retry and cancel jobs; accepting a host key and forgetting one are
admin actions, since they decide which machine the server trusts with a credential.
Credentials are write-only: no response ever contains them.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import client_ip
from core.roles import ADMIN
from fleet.board_packages import PACKAGE_SOURCES, TRAINING_CHOICES
from fleet.models import DeviceGroup, KnownHost, ProvisioningJob
from fleet.services.provisioning import (
    known_host_forget,
    provisioning_job_accept_host_key,
    provisioning_job_cancel,
    provisioning_job_create,
    provisioning_job_retry,
)


class ProvisioningJobSerializer(serializers.ModelSerializer[ProvisioningJob]):
    group: serializers.SlugRelatedField[DeviceGroup] = serializers.SlugRelatedField(
        slug_field="name", read_only=True
    )
    created_by = serializers.CharField(
        source="created_by.username", read_only=True, default=None, allow_null=True
    )
    device = serializers.UUIDField(source="device_id", read_only=True, allow_null=True)
    enrollment_token_prefix = serializers.CharField(
        source="enrollment_token.prefix", read_only=True, default=None, allow_null=True
    )
    has_credential = serializers.SerializerMethodField()

    class Meta:
        model = ProvisioningJob
        fields = [
            "id",
            "host",
            "port",
            "username",
            "auth_method",
            "has_credential",
            "options",
            "group",
            "tags",
            "status",
            "steps",
            "error",
            "error_code",
            "attempts",
            "host_key_type",
            "host_key_fingerprint",
            "host_facts",
            "enrollment_token_prefix",
            "device",
            "created_by",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields

    def get_has_credential(self, obj: ProvisioningJob) -> bool:
        return bool(obj.credential_encrypted)


class _CredentialInput(serializers.Serializer[Any]):
    private_key = serializers.CharField(
        required=False, allow_blank=True, trim_whitespace=False, write_only=True
    )
    password = serializers.CharField(required=False, allow_blank=True, trim_whitespace=False, write_only=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if bool(attrs.get("private_key")) == bool(attrs.get("password")):
            raise serializers.ValidationError("Give exactly one of private_key or password.")
        return attrs


class ProvisioningJobCreateInput(_CredentialInput):
    host = serializers.CharField(max_length=255)
    port = serializers.IntegerField(min_value=1, max_value=65535, default=22)
    username = serializers.CharField(max_length=100)
    python = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    install_dir = serializers.CharField(max_length=255, required=False, allow_blank=True, default="")
    server_url = serializers.URLField(required=False, allow_blank=True, default="")
    name = serializers.CharField(max_length=150, required=False, allow_blank=True, default="")
    group = serializers.SlugRelatedField(
        slug_field="name", queryset=DeviceGroup.objects.all(), required=False, allow_null=True, default=None
    )
    tags = serializers.ListField(child=serializers.CharField(max_length=50), required=False, default=list)
    enrollment_timeout_s = serializers.IntegerField(min_value=10, max_value=86400, required=False)
    packages = serializers.ChoiceField(
        choices=PACKAGE_SOURCES,
        required=False,
        default="",
        allow_blank=True,
        help_text="Where the agent's pinned packages come from: index (default), wheelhouse, or "
        "system (already on the board: checked, not installed).",
    )
    training = serializers.ChoiceField(
        choices=TRAINING_CHOICES,
        required=False,
        default="",
        allow_blank=True,
        help_text="Training runtime to install: none (default), torch, onnxruntime (x86_64 Linux, "
        "Python <= 3.12), or auto.",
    )
    wheelhouse = serializers.CharField(
        max_length=255,
        required=False,
        allow_blank=True,
        default="",
        help_text="With packages=wheelhouse: a directory of wheels already on the board "
        "(else the server's PROVISIONING_WHEELHOUSE is uploaded).",
    )

    def validate_install_dir(self, value: str) -> str:
        if value and not (value.startswith("/") or value == "~" or value.startswith("~/")):
            raise serializers.ValidationError("Use an absolute path or one starting with ~/.")
        return value

    def validate_wheelhouse(self, value: str) -> str:
        if value and not value.startswith("/"):
            raise serializers.ValidationError("Give the wheelhouse's absolute path on the board.")
        return value


class AcceptHostKeyInput(serializers.Serializer[Any]):
    fingerprint = serializers.CharField(max_length=100, help_text="SHA256:… as shown on the job.")


class RetryInput(_CredentialInput):
    pass


class ProvisioningJobViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.CreateModelMixin, viewsets.GenericViewSet[Any]
):
    """Install the agent on a board over SSH and follow every step."""

    serializer_class = ProvisioningJobSerializer
    filterset_fields = ["status", "host"]
    ordering_fields = ["created_at", "status"]
    search_fields = ["host", "username"]

    def get_queryset(self):
        return ProvisioningJob.objects.select_related("group", "created_by", "enrollment_token")

    def get_permissions(self):
        if self.action == "accept_host_key":
            self.required_role = ADMIN
        return super().get_permissions()

    @extend_schema(request=ProvisioningJobCreateInput, responses={201: ProvisioningJobSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = ProvisioningJobCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        job = provisioning_job_create(
            actor=request.user, remote_addr=client_ip(request), **data.validated_data
        )
        return Response(ProvisioningJobSerializer(job).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=AcceptHostKeyInput, responses={200: ProvisioningJobSerializer})
    @action(detail=True, methods=["post"], url_path="accept-host-key")
    def accept_host_key(self, request: Request, pk: str | None = None) -> Response:
        """Admin: trust the host key the job saw (give the fingerprint you verified on the board)."""
        data = AcceptHostKeyInput(data=request.data)
        data.is_valid(raise_exception=True)
        job = provisioning_job_accept_host_key(
            actor=request.user,
            job_id=int(self.get_object().pk),
            fingerprint=data.validated_data["fingerprint"],
            remote_addr=client_ip(request),
        )
        return Response(ProvisioningJobSerializer(job).data)

    @extend_schema(request=RetryInput, responses={200: ProvisioningJobSerializer})
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        """Run a failed or cancelled job again with a fresh credential."""
        data = RetryInput(data=request.data)
        data.is_valid(raise_exception=True)
        job = provisioning_job_retry(
            actor=request.user,
            job_id=int(self.get_object().pk),
            private_key=data.validated_data.get("private_key") or None,
            password=data.validated_data.get("password") or None,
            remote_addr=client_ip(request),
        )
        return Response(ProvisioningJobSerializer(job).data)

    @extend_schema(request=None, responses={200: ProvisioningJobSerializer})
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        """Stop a job that has not finished; its credential is wiped."""
        job = provisioning_job_cancel(
            actor=request.user, job_id=int(self.get_object().pk), remote_addr=client_ip(request)
        )
        return Response(ProvisioningJobSerializer(job).data)


class KnownHostSerializer(serializers.ModelSerializer[KnownHost]):
    accepted_by = serializers.CharField(
        source="accepted_by.username", read_only=True, default=None, allow_null=True
    )

    class Meta:
        model = KnownHost
        fields = ["id", "host", "port", "key_type", "key_b64", "fingerprint", "accepted_by", "accepted_at"]
        read_only_fields = fields


class KnownHostViewSet(
    mixins.ListModelMixin, mixins.RetrieveModelMixin, mixins.DestroyModelMixin, viewsets.GenericViewSet[Any]
):
    """SSH host keys accepted for provisioning. Deleting one (admin) forgets it."""

    serializer_class = KnownHostSerializer
    write_role = ADMIN
    filterset_fields = ["host", "port"]

    def get_queryset(self):
        return KnownHost.objects.select_related("accepted_by")

    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        known_host_forget(
            actor=request.user, known_host_id=int(self.get_object().pk), remote_addr=client_ip(request)
        )
        return Response(status=status.HTTP_204_NO_CONTENT)
