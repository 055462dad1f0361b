"""Operator API of federated jobs: create, list, detail, start/pause/resume/cancel, rounds."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import PrimaryKeyRelatedField, client_ip
from fleet.api.rollouts import RolloutSerializer
from fleet.models import DeviceGroup, Rollout
from models_registry.models import ModelFamily, ModelVersion
from training import selectors, services
from training.models import ClientUpdate, FederatedJob, FederatedRound
from training.services.shipping import federated_job_ship


class RoundSerializer(serializers.ModelSerializer[FederatedRound]):
    selected_count = serializers.SerializerMethodField()
    # Seconds per phase that ran (collect_s, aggregate_s, evaluate_s), from the round's fields.
    durations = serializers.DictField(child=serializers.FloatField(), read_only=True)
    version_label = serializers.SerializerMethodField()
    # The group's devices at selection and how many each reason left out.
    funnel = serializers.DictField(child=serializers.IntegerField(), read_only=True)
    evaluation_detail = serializers.DictField(read_only=True)
    # Accepted updates per training backend, e.g. {"torch": 3, "ort": 1} (from the view's
    # context: one query per page).
    backends = serializers.SerializerMethodField()

    class Meta:
        model = FederatedRound
        fields = [
            "id",
            "number",
            "kind",
            "status",
            "base_version",
            "selected_count",
            "eligible",
            "funnel",
            "deadline",
            "opened_at",
            "closed_at",
            "finished_at",
            "participants",
            "dropped",
            "rejected",
            "bytes_in",
            "bytes_out",
            "durations",
            "accuracy",
            "loss",
            "confusion",
            "metric_name",
            "metric",
            "evaluation",
            "evaluation_detail",
            "epsilon",
            "version",
            "version_label",
            "failure_reason",
            "backends",
        ]
        read_only_fields = fields

    def get_backends(self, obj: FederatedRound) -> dict[str, int]:
        by_round: dict[int, dict[str, int]] = self.context.get("backends") or {}
        if obj.pk in by_round:
            return by_round[obj.pk]
        return selectors.round_backends(round_ids=[obj.pk])[obj.pk]

    def get_selected_count(self, obj: FederatedRound) -> int:
        return len(obj.selected or [])

    def get_version_label(self, obj: FederatedRound) -> str | None:
        return obj.version.label if obj.version_id and obj.version else None


class UpdateSerializer(serializers.ModelSerializer[ClientUpdate]):
    device_name = serializers.CharField(source="device.name", read_only=True)

    class Meta:
        model = ClientUpdate
        fields = [
            "id",
            "device",
            "device_name",
            "status",
            "backend",
            "reason_code",
            "reason_message",
            "num_examples",
            "bytes",
            "norm",
            "metrics",
            "received_at",
        ]
        read_only_fields = fields


class JobSerializer(serializers.ModelSerializer[FederatedJob]):
    family = serializers.SlugRelatedField(slug_field="name", queryset=ModelFamily.objects.all())
    base_version = PrimaryKeyRelatedField(queryset=ModelVersion.objects.all())
    target_group = serializers.SlugRelatedField(slug_field="name", queryset=DeviceGroup.objects.all())

    class Meta:
        model = FederatedJob
        fields = [
            "id",
            "family",
            "base_version",
            "target_group",
            *services.JOB_FIELDS,
            "status",
            "current_round",
            "consecutive_failures",
            "best_version",
            "best_accuracy",
            "best_metric",
            "error",
            "created_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = [
            "id",
            "status",
            "current_round",
            "consecutive_failures",
            "best_version",
            "best_accuracy",
            "best_metric",
            "error",
            "created_at",
            "started_at",
            "finished_at",
        ]
        extra_kwargs = {"name": {"required": False}}


class ShipInput(serializers.Serializer[Any]):
    """What a ship call may set; anything left out keeps the defaults of a shipped rollout."""

    target_group = serializers.CharField(
        required=False, help_text="Group id or name; default the job's group."
    )
    variant = serializers.ChoiceField(
        choices=["as_trained", "recommended"], required=False, default="as_trained"
    )
    latency_budget_us = serializers.FloatField(
        required=False, min_value=0.001, help_text="For variant 'recommended': median single-input latency."
    )
    max_accuracy_drop = serializers.FloatField(required=False, min_value=0)
    control_percent = serializers.FloatField(
        required=False,
        min_value=0,
        max_value=50,
        help_text="Share kept on the incumbent (default 20; 0: none).",
    )
    force = serializers.BooleanField(
        required=False, default=False, help_text="Ship from a job still running."
    )
    shadow = serializers.JSONField(
        required=False,
        help_text="Shadow phase before the first wave (default on, with its defaults): "
        '{"sample_rate", "min_devices", "min_samples", "max_drop", "min_agreement", "timeout_s", '
        '"on_timeout"}, or false for none.',
    )
    name = serializers.CharField(required=False, max_length=150)
    waves = serializers.ListField(child=serializers.DictField(), required=False)
    gates = serializers.ListField(child=serializers.DictField(), required=False)
    control_gates = serializers.ListField(child=serializers.DictField(), required=False)
    on_gate_failure = serializers.ChoiceField(choices=Rollout.OnGateFailure.choices, required=False)
    success_threshold = serializers.FloatField(required=False, min_value=0, max_value=1)
    error_threshold_share = serializers.FloatField(required=False, min_value=0, max_value=1)
    error_threshold_count = serializers.IntegerField(required=False, min_value=1)
    max_concurrent_downloads = serializers.IntegerField(required=False, min_value=1)
    respect_maintenance_windows = serializers.BooleanField(required=False)


class ShipOutput(serializers.Serializer[Any]):
    """The plan a ship call carried out, with the numbers behind each choice, and the rollout."""

    job = serializers.IntegerField()
    job_status = serializers.CharField()
    forced = serializers.BooleanField()
    round = serializers.IntegerField(allow_null=True)
    evaluation = serializers.JSONField(help_text="kind (central or federated), metric, value, base value")
    version = serializers.JSONField(help_text="id, label, stage, and the stages it was promoted through")
    variant = serializers.JSONField(help_text="requested, chosen, and why")
    target_group = serializers.JSONField()
    boards = serializers.JSONField(help_text="boards, can_run, held_back_count, reasons with counts")
    held_back = serializers.JSONField(help_text="[{device, reason}] (first 100)")
    control = serializers.JSONField(help_text="percent, devices, treated_devices, minimum, gates")
    steps = serializers.JSONField(help_text="shadow (running or skipped), staged_rollout, promotion")
    rollout = RolloutSerializer()


class FederatedJobViewSet(
    mixins.CreateModelMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Any]
):
    """Federated jobs. Writes go through the training services (audited)."""

    serializer_class = JobSerializer
    filterset_fields = ["status", "family"]
    ordering_fields = ["id", "created_at"]

    def get_queryset(self) -> Any:
        return selectors.job_list()

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        job = services.job_create(
            actor=request.user,
            family=data.pop("family"),
            base_version=data.pop("base_version"),
            target_group=data.pop("target_group"),
            remote_addr=client_ip(request),
            **data,
        )
        return Response(self.get_serializer(job).data, status=status.HTTP_201_CREATED)

    def _act(self, request: Request, pk: str, fn: Any) -> Response:
        job = fn(job_id=int(pk), actor=request.user, remote_addr=client_ip(request))
        return Response(self.get_serializer(job).data)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str) -> Response:
        return self._act(request, pk, services.job_start)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str) -> Response:
        return self._act(request, pk, services.job_pause)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str) -> Response:
        return self._act(request, pk, services.job_resume)

    @extend_schema(request=None, responses=JobSerializer)
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str) -> Response:
        return self._act(request, pk, services.job_cancel)

    @extend_schema(request=ShipInput, responses={201: ShipOutput})
    @action(detail=True, methods=["post"])
    def ship(self, request: Request, pk: str) -> Response:
        """Ship the job's best version: promote it as the stages require, leave out boards that
        cannot run it, and start a staged rollout with a control cohort (one transaction)."""
        body = ShipInput(data=request.data)
        body.is_valid(raise_exception=True)
        result = federated_job_ship(
            job_id=int(pk), actor=request.user, data=dict(body.validated_data), remote_addr=client_ip(request)
        )
        return Response(
            {**result.plan, "rollout": RolloutSerializer(result.rollout).data}, status=status.HTTP_201_CREATED
        )

    @extend_schema(responses=RoundSerializer(many=True))
    @action(detail=True, methods=["get"])
    def rounds(self, request: Request, pk: str) -> Response:
        self.get_object()
        page = self.paginate_queryset(selectors.job_rounds(job_id=int(pk)))
        rows = list(page or [])
        backends = selectors.round_backends(round_ids=[r.pk for r in rows])
        data = RoundSerializer(rows, many=True, context={"backends": backends}).data
        return self.get_paginated_response(data)

    @extend_schema(responses=UpdateSerializer(many=True))
    @action(detail=True, methods=["get"], url_path=r"rounds/(?P<number>[0-9]{1,9})/updates")
    def round_updates(self, request: Request, pk: str, number: str) -> Response:
        """Every device's answer to one round: accepted or rejected (with the reason, also for
        failures the device reported) and the training backend it used."""
        self.get_object()
        page = self.paginate_queryset(selectors.round_updates(job_id=int(pk), number=int(number)))
        return self.get_paginated_response(UpdateSerializer(page, many=True).data)
