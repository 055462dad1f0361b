"""Operator API routes of the fleet app, one module per area."""

from django.urls import include, path

urlpatterns = [
    path("", include("fleet.api.urls_devices")),
    path("", include("fleet.api.urls_provisioning")),
    path("", include("fleet.api.urls_rollouts")),
]
