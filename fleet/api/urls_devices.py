"""Operator routes: devices, device groups, enrollment tokens, update policies."""

from django.urls import path

from core.api import Router
from fleet.api.devices import DeviceGroupViewSet, DeviceViewSet, EnrollmentTokenViewSet, UpdatePolicyViewSet
from fleet.api.drift import DriftReportsView, DriftSummaryView
from fleet.api.personalisation import PersonalisationView
from fleet.api.recommend import FamilyRecommendApi
from fleet.api.revert import FamilyPolicyApi, VersionDecisionListApi, VersionRevertApi

router = Router()
router.register("devices", DeviceViewSet, basename="device")
router.register("device-groups", DeviceGroupViewSet, basename="device-group")
router.register("enrollment-tokens", EnrollmentTokenViewSet, basename="enrollment-token")
router.register("update-policies", UpdatePolicyViewSet, basename="update-policy")

urlpatterns = router.urls + [
    path("drift/", DriftSummaryView.as_view(), name="drift-summary"),
    path("drift/reports/", DriftReportsView.as_view(), name="drift-reports"),
    path("personalisation/", PersonalisationView.as_view(), name="personalisation"),
    # A model family's route, served here because it reads what boards measured.
    path("models/<int:pk>/recommend/", FamilyRecommendApi.as_view(), name="model-family-recommend"),
    # Reverting a version everywhere and a family's policy: fleet work on registry routes.
    path("model-versions/<int:pk>/revert/", VersionRevertApi.as_view(), name="model-version-revert"),
    path("models/<int:pk>/policy/", FamilyPolicyApi.as_view(), name="model-family-policy"),
    path("version-decisions/", VersionDecisionListApi.as_view(), name="version-decisions"),
]
