"""Operator API: rollouts, A/B experiments and webhook endpoints with their delivery log.

Workflow actions (start, pause, resume, abort, rollback, advance-now; experiment start,
stop, evaluate, promote) are one POST each and call a service, which records the audit
event and the decision row.
"""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import AuditedWritesMixin, IdField, IntegerField, client_ip
from core.roles import has_role
from fleet.models import (
    Experiment,
    ExperimentDecision,
    Rollout,
    RolloutDecision,
    RolloutDevice,
    WebhookDelivery,
    WebhookEndpoint,
)
from fleet.outbound import url_refusal
from fleet.selectors.experiments import experiment_arm_counts, experiment_decisions, experiment_list
from fleet.selectors.rollouts import rollout_decisions, rollout_list, rollout_members, rollout_summary
from fleet.services import experiments as experiment_services
from fleet.services import rollouts as rollout_services
from fleet.services.webhooks import event_types, webhook_endpoint_test

# --- rollouts ---------------------------------------------------------------------------


def _reason(request: Request) -> str:
    """The optional free-text `reason` of a pause, abort, rollback or stop action."""
    return str(request.data.get("reason", "")) if isinstance(request.data, dict) else ""


class RolloutSerializer(serializers.ModelSerializer[Rollout]):
    version_label = serializers.CharField(source="version.label", read_only=True)
    summary = serializers.SerializerMethodField()

    class Meta:
        model = Rollout
        fields = [
            "id",
            "name",
            "version",
            "version_label",
            "target_group",
            "target_tags",
            "target_device_ids",
            "waves",
            "success_threshold",
            "error_threshold_share",
            "error_threshold_count",
            "gates",
            "on_gate_failure",
            "max_concurrent_downloads",
            "max_retries",
            "retry_backoff_s",
            "in_progress_timeout_s",
            "respect_maintenance_windows",
            "control_percent",
            "control_gates",
            "held_back",
            "shadow_policy",
            "shadow",
            "status",
            "status_reason",
            "current_wave",
            "wave_started_at",
            "origin",
            "created_at",
            "started_at",
            "finished_at",
            "summary",
        ]
        read_only_fields = fields

    def get_summary(self, obj: Rollout) -> dict[str, Any]:
        return rollout_summary(rollout=obj)


class RolloutCreateInput(serializers.Serializer[Any]):
    name = serializers.CharField(required=False, allow_blank=True, max_length=150)
    version = IdField()
    target_group = IdField(required=False, allow_null=True)
    target_tags = serializers.ListField(child=serializers.CharField(), required=False)
    target_device_ids = serializers.ListField(child=serializers.UUIDField(), required=False)
    waves = serializers.ListField(
        child=serializers.DictField(),
        help_text='Cumulative: [{"percent": 2, "soak_s": 600}, {"count": 50, "soak_s": 600}, ...]',
    )
    gates = serializers.ListField(
        child=serializers.DictField(),
        required=False,
        help_text='[{"metric": "latency_p95_ms", "max_increase_pct": 20, "min_samples": 100, '
        '"min_devices": 3}, ...]: min_samples per device; judged on the median over devices',
    )
    success_threshold = serializers.FloatField(required=False, min_value=0, max_value=1)
    error_threshold_share = serializers.FloatField(required=False, min_value=0, max_value=1)
    error_threshold_count = IntegerField(required=False, allow_null=True, min_value=1)
    on_gate_failure = serializers.ChoiceField(choices=Rollout.OnGateFailure.choices, required=False)
    max_concurrent_downloads = IntegerField(required=False, allow_null=True, min_value=1)
    max_retries = IntegerField(required=False, min_value=0)
    retry_backoff_s = serializers.FloatField(required=False, min_value=0)
    in_progress_timeout_s = serializers.FloatField(required=False, min_value=1)
    respect_maintenance_windows = serializers.BooleanField(required=False)
    control_percent = serializers.FloatField(
        required=False,
        min_value=0,
        max_value=50,
        help_text="Share of the target (seeded by the rollout) kept on the incumbent and judged against",
    )
    control_gates = serializers.ListField(
        child=serializers.DictField(),
        required=False,
        help_text='[{"metric": "accuracy", "margin": 0.01, "alpha": 0.05, "min_devices": 5}]: '
        "mSPRT on per-device values, candidate vs control over the same window",
    )
    shadow = serializers.JSONField(
        required=False,
        help_text='Shadow phase before the first wave: {"sample_rate": 1, "min_devices": 3, '
        '"min_samples": 10, "max_drop": 0.02, "min_agreement": null, "timeout_s": 3600, '
        '"on_timeout": "continue"}; omitted or false: none',
    )


class ReasonInput(serializers.Serializer[Any]):
    reason = serializers.CharField(required=False, allow_blank=True, max_length=500)


class RolloutDecisionSerializer(serializers.ModelSerializer[RolloutDecision]):
    class Meta:
        model = RolloutDecision
        fields = ["id", "wave", "action", "reason", "metrics", "actor", "created_at"]
        read_only_fields = fields


class RolloutDeviceSerializer(serializers.ModelSerializer[RolloutDevice]):
    device_name = serializers.CharField(source="device.name", read_only=True)

    class Meta:
        model = RolloutDevice
        fields = [
            "device",
            "device_name",
            "wave",
            "state",
            "previous_version",
            "deployment",
            "attempts",
            "attempt_started_at",
            "next_retry_at",
            "finished_at",
            "ever_active",
            "error",
        ]
        read_only_fields = fields


class RolloutViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Any]):
    """Staged rollouts of a model version, with their waves, gates and decisions."""

    serializer_class = RolloutSerializer
    filterset_fields = ["status", "version"]
    ordering_fields = ["created_at", "status"]

    def get_queryset(self):
        return rollout_list()

    def _done(self, rollout: Rollout) -> Response:
        rollout.refresh_from_db()
        return Response(RolloutSerializer(rollout).data)

    @extend_schema(request=RolloutCreateInput, responses={201: RolloutSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = RolloutCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        payload = dict(data.validated_data)
        if "target_device_ids" in payload:
            payload["target_device_ids"] = [str(d) for d in payload["target_device_ids"]]
        rollout = rollout_services.rollout_create(
            actor=request.user, data=payload, remote_addr=client_ip(request)
        )
        return Response(RolloutSerializer(rollout).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: RolloutSerializer})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        """Open the first wave."""
        rollout = rollout_services.rollout_start(
            rollout_id=int(self.get_object().pk), actor=request.user, remote_addr=client_ip(request)
        )
        return self._done(rollout)

    @extend_schema(request=ReasonInput, responses={200: RolloutSerializer})
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str | None = None) -> Response:
        """Stop opening waves and releasing devices."""
        reason = _reason(request)
        rollout = rollout_services.rollout_pause(
            rollout_id=int(self.get_object().pk),
            actor=request.user,
            reason=reason,
            remote_addr=client_ip(request),
        )
        return self._done(rollout)

    @extend_schema(request=None, responses={200: RolloutSerializer})
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        """Run again; the current wave's soak window restarts."""
        rollout = rollout_services.rollout_resume(
            rollout_id=int(self.get_object().pk), actor=request.user, remote_addr=client_ip(request)
        )
        return self._done(rollout)

    @extend_schema(request=ReasonInput, responses={200: RolloutSerializer})
    @action(detail=True, methods=["post"])
    def abort(self, request: Request, pk: str | None = None) -> Response:
        """Stop for good; devices not yet on the new version stay on theirs."""
        reason = _reason(request)
        rollout = rollout_services.rollout_abort(
            rollout_id=int(self.get_object().pk),
            actor=request.user,
            reason=reason,
            remote_addr=client_ip(request),
        )
        return self._done(rollout)

    @extend_schema(request=ReasonInput, responses={200: RolloutSerializer})
    @action(detail=True, methods=["post"])
    def rollback(self, request: Request, pk: str | None = None) -> Response:
        """Send every device the rollout touched back to its previous version."""
        reason = _reason(request)
        rollout = rollout_services.rollout_rollback(
            rollout_id=int(self.get_object().pk),
            actor=request.user,
            reason=reason,
            remote_addr=client_ip(request),
        )
        return self._done(rollout)

    @extend_schema(request=None, responses={200: RolloutSerializer})
    @action(detail=True, methods=["post"], url_path="advance-now")
    def advance_now(self, request: Request, pk: str | None = None) -> Response:
        """Open the next wave now, skipping the current wave's soak and gates."""
        rollout = rollout_services.rollout_advance_now(
            rollout_id=int(self.get_object().pk), actor=request.user, remote_addr=client_ip(request)
        )
        return self._done(rollout)

    @extend_schema(responses={200: RolloutDecisionSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def decisions(self, request: Request, pk: str | None = None) -> Response:
        """Every decision, oldest first, with the numbers behind it."""
        qs = rollout_decisions(rollout=self.get_object())
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(RolloutDecisionSerializer(page, many=True).data)

    @extend_schema(responses={200: RolloutDeviceSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def devices(self, request: Request, pk: str | None = None) -> Response:
        """The devices the rollout reached so far, by wave, with their state."""
        qs = rollout_members(rollout=self.get_object())
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(RolloutDeviceSerializer(page, many=True).data)


# --- experiments ------------------------------------------------------------------------


class ExperimentSerializer(serializers.ModelSerializer[Experiment]):
    arm_devices = serializers.SerializerMethodField()

    class Meta:
        model = Experiment
        fields = [
            "id",
            "name",
            "target_group",
            "arms",
            "primary_metric",
            "guardrails",
            "min_samples_per_arm",
            "min_samples_per_device",
            "min_devices_per_arm",
            "alpha",
            "effect_scale",
            "status",
            "result",
            "winner_arm",
            "promoted_rollout",
            "created_at",
            "started_at",
            "finished_at",
            "arm_devices",
        ]
        read_only_fields = fields

    def get_arm_devices(self, obj: Experiment) -> list[dict[str, Any]]:
        return experiment_arm_counts(experiment=obj)


class ExperimentCreateInput(serializers.Serializer[Any]):
    name = serializers.CharField(max_length=150)
    target_group = IdField()
    arms = serializers.ListField(
        child=serializers.DictField(), help_text='[{"name": "control", "version_id": 3, "share": 0.5}, ...]'
    )
    primary_metric = serializers.ChoiceField(choices=Experiment.PrimaryMetric.choices, required=False)
    guardrails = serializers.ListField(child=serializers.DictField(), required=False)
    min_samples_per_arm = IntegerField(required=False, min_value=2)
    min_samples_per_device = IntegerField(
        required=False, min_value=1, help_text="Samples a device needs before its mean counts (20)."
    )
    min_devices_per_arm = IntegerField(
        required=False, min_value=2, help_text="Counted devices each arm needs before it is compared (5)."
    )
    alpha = serializers.FloatField(required=False)
    effect_scale = serializers.FloatField(required=False, min_value=0.000001)


class PromoteInput(serializers.Serializer[Any]):
    start = serializers.BooleanField(required=False, default=False)
    rollout = serializers.DictField(required=False, help_text="Waves, gates and other rollout fields.")


class ExperimentDecisionSerializer(serializers.ModelSerializer[ExperimentDecision]):
    class Meta:
        model = ExperimentDecision
        fields = ["id", "action", "reason", "metrics", "actor", "created_at"]
        read_only_fields = fields


class ExperimentViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet[Any]):
    """A/B experiments between model versions on a device group."""

    serializer_class = ExperimentSerializer
    filterset_fields = ["status"]
    ordering_fields = ["created_at", "status"]

    def get_queryset(self):
        return experiment_list()

    @extend_schema(request=ExperimentCreateInput, responses={201: ExperimentSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        data = ExperimentCreateInput(data=request.data)
        data.is_valid(raise_exception=True)
        experiment = experiment_services.experiment_create(
            actor=request.user, data=dict(data.validated_data), remote_addr=client_ip(request)
        )
        return Response(ExperimentSerializer(experiment).data, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses={200: ExperimentSerializer})
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        """Assign the group's devices to arms and ship each arm's version."""
        experiment = experiment_services.experiment_start(
            experiment_id=int(self.get_object().pk), actor=request.user, remote_addr=client_ip(request)
        )
        experiment.refresh_from_db()
        return Response(ExperimentSerializer(experiment).data)

    @extend_schema(request=ReasonInput, responses={200: ExperimentSerializer})
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        """Stop and send devices back to their previous versions."""
        reason = _reason(request)
        experiment = experiment_services.experiment_stop(
            experiment_id=int(self.get_object().pk),
            actor=request.user,
            reason=reason,
            remote_addr=client_ip(request),
        )
        return Response(ExperimentSerializer(experiment).data)

    @extend_schema(request=None, responses={200: ExperimentSerializer})
    @action(detail=True, methods=["post"])
    def evaluate(self, request: Request, pk: str | None = None) -> Response:
        """Evaluate now instead of waiting for the periodic task."""
        experiment = self.get_object()
        experiment_services.experiment_evaluate(experiment_id=int(experiment.pk))
        experiment.refresh_from_db()
        return Response(ExperimentSerializer(experiment).data)

    @extend_schema(request=PromoteInput, responses={201: RolloutSerializer})
    @action(detail=True, methods=["post"])
    def promote(self, request: Request, pk: str | None = None) -> Response:
        """Create (and optionally start) a rollout of the winning arm to the group."""
        data = PromoteInput(data=request.data)
        data.is_valid(raise_exception=True)
        rollout = experiment_services.experiment_promote(
            experiment_id=int(self.get_object().pk),
            actor=request.user,
            rollout=data.validated_data.get("rollout"),
            start=bool(data.validated_data.get("start")),
            remote_addr=client_ip(request),
        )
        return Response(RolloutSerializer(rollout).data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={200: ExperimentDecisionSerializer(many=True)})
    @action(detail=True, methods=["get"])
    def decisions(self, request: Request, pk: str | None = None) -> Response:
        qs = experiment_decisions(experiment=self.get_object())
        page = self.paginate_queryset(qs)
        return self.get_paginated_response(ExperimentDecisionSerializer(page, many=True).data)


# --- webhooks ---------------------------------------------------------------------------


class WebhookEndpointSerializer(serializers.ModelSerializer[WebhookEndpoint]):
    secret = serializers.CharField(write_only=True, min_length=16, max_length=128)

    class Meta:
        model = WebhookEndpoint
        fields = ["id", "name", "url", "secret", "event_types", "active", "created_at"]
        read_only_fields = ["id", "created_at"]

    def validate_url(self, value: str) -> str:
        reason = url_refusal(value)
        if reason is not None:
            raise serializers.ValidationError(f"Webhooks cannot be sent there: {reason}.")
        return value

    def validate_event_types(self, value: Any) -> list[str]:
        if not isinstance(value, list):
            raise serializers.ValidationError("A list of event types.")
        known = event_types()
        for item in value:
            exact = item in known
            prefix = (
                isinstance(item, str) and item.endswith(".*") and any(t.startswith(item[:-1]) for t in known)
            )
            if not (exact or prefix):
                raise serializers.ValidationError(f"Unknown event type {item!r}.")
        return value


class WebhookDeliverySerializer(serializers.ModelSerializer[WebhookDelivery]):
    class Meta:
        model = WebhookDelivery
        fields = [
            "id",
            "event_id",
            "event_type",
            "payload",
            "status",
            "attempts",
            "max_attempts",
            "response_code",
            "next_attempt_at",
            "last_error",
            "created_at",
            "delivered_at",
        ]
        read_only_fields = fields

    def to_representation(self, instance: WebhookDelivery) -> dict[str, Any]:
        data = super().to_representation(instance)
        request = self.context.get("request")
        # A receiver's error body can say anything about the receiver's side; viewers see
        # only that it failed and the status code.
        if request is None or not has_role(request.user, "operator"):
            data["last_error"] = "(visible to operators)" if data.get("last_error") else ""
        return data


class WebhookEndpointViewSet(AuditedWritesMixin, viewsets.ModelViewSet[Any]):
    """Receivers of signed event notifications. The secret is write-only."""

    serializer_class = WebhookEndpointSerializer
    audit_name = "webhook"
    queryset = WebhookEndpoint.objects.all()

    @extend_schema(responses={200: WebhookDeliverySerializer(many=True)})
    @action(detail=True, methods=["get"])
    def deliveries(self, request: Request, pk: str | None = None) -> Response:
        """The delivery log of this endpoint, newest first."""
        qs = WebhookDelivery.objects.filter(endpoint=self.get_object()).order_by("-created_at", "-id")
        page = self.paginate_queryset(qs)
        data = WebhookDeliverySerializer(page, many=True, context={"request": request}).data
        return self.get_paginated_response(data)

    @extend_schema(request=None, responses={202: WebhookDeliverySerializer})
    @action(detail=True, methods=["post"])
    def test(self, request: Request, pk: str | None = None) -> Response:
        """Queue a signed `ping`; a worker sends it (see the delivery log for how it went)."""
        delivery = webhook_endpoint_test(endpoint_id=int(self.get_object().pk))
        return Response(WebhookDeliverySerializer(delivery, context={"request": request}).data, status=202)
