"""Only the fleet routes under test, at their real paths, so these tests do not depend on
the state of unrelated apps' URL modules."""

from django.urls import include, path

urlpatterns = [
    path("api/agent/v1/", include("fleet.api.agent_urls")),
    path("api/v1/", include("fleet.api.urls_devices")),
]
