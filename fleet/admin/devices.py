"""Admin: devices, groups, enrollment tokens, policies, deployments, commands."""

from __future__ import annotations

from django.contrib import admin

from fleet.models import (
    Deployment,
    DeploymentEvent,
    Device,
    DeviceCommand,
    DeviceGroup,
    EnrollmentToken,
    UpdatePolicy,
)


@admin.register(Device)
class DeviceAdmin(admin.ModelAdmin):
    list_display = ["name", "status", "last_seen", "running_version", "desired_version", "deployment_state"]
    list_filter = ["status", "deployment_state"]
    search_fields = ["name", "id"]
    list_select_related = ["running_version__family", "desired_version__family"]
    readonly_fields = ["id", "secret_hash", "last_seen", "last_seq", "enrolled_at", "decommissioned_at"]
    raw_id_fields = ["running_version", "desired_version", "previous_version", "enrollment_token"]


@admin.register(DeviceGroup)
class DeviceGroupAdmin(admin.ModelAdmin):
    list_display = ["name", "canary", "policy", "created_at"]
    list_filter = ["canary"]
    search_fields = ["name"]


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "use_count", "max_uses", "expires_at", "revoked_at"]
    readonly_fields = ["token_hash", "prefix", "use_count", "created_at", "created_by"]


@admin.register(UpdatePolicy)
class UpdatePolicyAdmin(admin.ModelAdmin):
    list_display = ["name", "timezone", "heartbeat_interval_s", "updated_at"]
    search_fields = ["name"]


class DeploymentEventInline(admin.TabularInline):
    model = DeploymentEvent
    extra = 0
    readonly_fields = ["state", "message", "detail", "reported_at", "created_at"]


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    list_display = ["id", "device", "version", "state", "origin_type", "origin_id", "updated_at"]
    list_filter = ["state", "origin_type"]
    raw_id_fields = ["device", "version"]
    inlines = [DeploymentEventInline]


@admin.register(DeviceCommand)
class DeviceCommandAdmin(admin.ModelAdmin):
    list_display = ["id", "device", "kind", "status", "created_at", "finished_at"]
    list_filter = ["status", "kind"]
    raw_id_fields = ["device"]
