from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from config import health
from core.api import Router
from core.audit.api import AuditEventViewSet
from core.logins import TokenLoginApi

# Small resources that live outside the apps' own routers (the audit log).
core_router = Router()
core_router.register("audit-events", AuditEventViewSet, basename="audit-event")

urlpatterns = [
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("api/schema/", SpectacularAPIView.as_view(), name="api-schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="api-schema"), name="api-docs"),
    path("api/agent/v1/", include("fleet.api.agent_urls")),
    path("api/agent/v1/", include("training.api.agent_urls")),
    path("api/v1/auth/token/", TokenLoginApi.as_view(), name="api-token-login"),
    path("api/v1/", include("fleet.api.urls")),
    path("api/v1/", include("models_registry.api.urls")),
    path("api/v1/", include("training.api.urls")),
    path("api/v1/", include(core_router.urls)),
    path("admin/", admin.site.urls),
    path("", include("frontend.urls")),
]

handler404 = "config.errors.not_found"
handler500 = "config.errors.server_error"
