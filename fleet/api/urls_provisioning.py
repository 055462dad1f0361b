"""Operator API routes: provisioning jobs and known SSH hosts."""

from rest_framework.routers import DefaultRouter

from fleet.api.provisioning import KnownHostViewSet, ProvisioningJobViewSet

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("provisioning-jobs", ProvisioningJobViewSet, basename="provisioning-job")
router.register("known-hosts", KnownHostViewSet, basename="known-host")

urlpatterns = router.urls
