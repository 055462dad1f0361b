"""The fleet routes these tests use, at their real paths."""

from django.urls import include, path

urlpatterns = [
    path("api/agent/v1/", include("fleet.api.agent_urls")),
    path("api/v1/", include("fleet.api.urls_devices")),
    path("api/v1/", include("fleet.api.urls_rollouts")),
]
