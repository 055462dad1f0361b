"""Operator API routes of the model registry, under /api/v1/."""

from typing import Any

from django.urls import include, path

from core.api import Router
from models_registry.api import views

router = Router()
router.register("models", views.ModelFamilyViewSet, basename="model-family")
router.register("model-versions", views.ModelVersionViewSet, basename="model-version")
router.register("model-jobs", views.ModelJobViewSet, basename="model-job")
router.register("datasets", views.DatasetViewSet, basename="dataset")
# The former route, kept as a read-only alias.
router.register("evaluation-datasets", views.EvaluationDatasetViewSet, basename="evaluation-dataset")

urlpatterns: list[Any] = [
    path("signing-key/", views.SigningKeyApi.as_view(), name="signing-key"),
    path("", include(router.urls)),
]
