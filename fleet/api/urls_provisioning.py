"""Operator API routes: provisioning jobs and known SSH hosts."""

from django.urls import path

from core.api import Router
from fleet.api.agent_package import AgentPackageView, AgentRequirementsView
from fleet.api.provisioning import KnownHostViewSet, ProvisioningJobViewSet

router = Router()
router.register("provisioning-jobs", ProvisioningJobViewSet, basename="provisioning-job")
router.register("known-hosts", KnownHostViewSet, basename="known-host")

urlpatterns = [
    path("agent/package/", AgentPackageView.as_view(), name="agent-package"),
    path("agent/requirements/", AgentRequirementsView.as_view(), name="agent-requirements"),
    *router.urls,
]
