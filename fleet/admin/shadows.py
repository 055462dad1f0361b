"""Admin: shadow deployments (read-only; start and stop go through the API's services)."""

from typing import Any

from django.contrib import admin

from fleet.models import Shadow, ShadowMember


class ShadowMemberInline(admin.TabularInline):
    model = ShadowMember
    extra = 0
    raw_id_fields = ["device"]
    readonly_fields = ["device", "active", "created_at"]
    can_delete = False


@admin.register(Shadow)
class ShadowAdmin(admin.ModelAdmin):
    list_display = ["id", "version", "group", "status", "sample_rate", "max_cpu_percent", "created_at"]
    list_filter = ["status"]
    inlines = [ShadowMemberInline]

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_add_permission(self, request: Any) -> bool:
        return False
