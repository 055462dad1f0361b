"""Admin: rollouts, experiments, webhooks, family policies and version decisions (read-mostly;
workflows go through the API)."""

from django.contrib import admin

from fleet.models import (
    Experiment,
    ExperimentAssignment,
    ExperimentDecision,
    FamilyPolicy,
    Rollout,
    RolloutDecision,
    RolloutDevice,
    VersionDecision,
    WebhookDelivery,
    WebhookEndpoint,
)


class RolloutDecisionInline(admin.TabularInline):
    model = RolloutDecision
    extra = 0
    readonly_fields = ["wave", "action", "reason", "metrics", "actor", "created_at"]
    can_delete = False


@admin.register(Rollout)
class RolloutAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "version", "status", "current_wave", "created_at"]
    list_filter = ["status"]
    readonly_fields = ["status", "current_wave", "wave_started_at", "revision", "started_at", "finished_at"]
    inlines = [RolloutDecisionInline]


@admin.register(RolloutDevice)
class RolloutDeviceAdmin(admin.ModelAdmin):
    list_display = ["rollout", "device", "wave", "state", "attempts", "finished_at"]
    list_filter = ["state"]
    raw_id_fields = ["rollout", "device", "deployment"]


@admin.register(Experiment)
class ExperimentAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "status", "primary_metric", "winner_arm", "created_at"]
    list_filter = ["status"]


@admin.register(ExperimentAssignment)
class ExperimentAssignmentAdmin(admin.ModelAdmin):
    list_display = ["experiment", "device", "arm", "version"]
    raw_id_fields = ["experiment", "device"]


@admin.register(ExperimentDecision)
class ExperimentDecisionAdmin(admin.ModelAdmin):
    list_display = ["experiment", "action", "created_at"]


@admin.register(WebhookEndpoint)
class WebhookEndpointAdmin(admin.ModelAdmin):
    list_display = ["id", "name", "url", "active"]


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(admin.ModelAdmin):
    list_display = ["id", "endpoint", "event_type", "status", "attempts", "response_code", "created_at"]
    list_filter = ["status", "event_type"]


@admin.register(FamilyPolicy)
class FamilyPolicyAdmin(admin.ModelAdmin):
    list_display = ["family", "on_failure", "watch_s", "drift_job", "drift_job_interval_s", "auto_ship"]


@admin.register(VersionDecision)
class VersionDecisionAdmin(admin.ModelAdmin):
    list_display = ["id", "version", "action", "trigger", "devices_reverted", "devices_without_previous"]
    list_filter = ["action", "trigger"]
    readonly_fields = [f.name for f in VersionDecision._meta.fields]
