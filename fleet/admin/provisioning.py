"""Admin: provisioning jobs (read-only: they change through the API) and known hosts."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from fleet.models import KnownHost, ProvisioningJob


@admin.register(ProvisioningJob)
class ProvisioningJobAdmin(admin.ModelAdmin):
    list_display = ["id", "host", "port", "username", "status", "device", "created_at", "finished_at"]
    list_filter = ["status"]
    search_fields = ["host", "username"]
    # The encrypted credential never shows, not even encrypted.
    exclude = ["credential_encrypted"]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(KnownHost)
class KnownHostAdmin(admin.ModelAdmin):
    list_display = ["host", "port", "key_type", "fingerprint", "accepted_by", "accepted_at"]
    search_fields = ["host", "fingerprint"]

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False
