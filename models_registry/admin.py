"""Admin views of the registry: read-mostly, since versions and artifacts never change."""

from __future__ import annotations

from typing import Any

from django.contrib import admin

from models_registry.models import (
    Artifact,
    EvaluationDataset,
    EvaluationReport,
    ModelFamily,
    ModelJob,
    ModelVersion,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    """Rows written only by services (uploads, jobs): the admin shows them."""

    def has_add_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False


@admin.register(ModelFamily)
class ModelFamilyAdmin(admin.ModelAdmin):
    list_display = ["name", "arch", "task", "num_classes", "created_at"]
    search_fields = ["name"]
    readonly_fields = ["arch", "input_shape", "num_classes", "created_by"]


class ArtifactInline(admin.TabularInline):
    model = Artifact
    extra = 0
    can_delete = False
    fields = ["kind", "sha256", "size", "opset", "file"]
    readonly_fields = ["kind", "sha256", "size", "opset", "file"]


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    list_display = ["__str__", "variant", "source", "stage", "created_at"]
    list_filter = ["stage", "source", "variant", "family"]
    list_select_related = ["family"]
    inlines = [ArtifactInline]


@admin.register(EvaluationReport)
class EvaluationReportAdmin(ReadOnlyAdmin):
    list_display = ["version", "dataset", "created_at"]
    list_select_related = ["version__family"]


@admin.register(EvaluationDataset)
class EvaluationDatasetAdmin(ReadOnlyAdmin):
    list_display = ["name", "split", "num_examples", "num_classes", "created_at"]


@admin.register(ModelJob)
class ModelJobAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "status", "version", "progress", "created_at", "finished_at"]
    list_filter = ["kind", "status"]
    list_select_related = ["version__family"]
