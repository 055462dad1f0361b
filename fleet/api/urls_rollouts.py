"""Operator routes: rollouts, experiments, shadows, webhooks."""

from rest_framework.routers import DefaultRouter

from fleet.api.rollouts import ExperimentViewSet, RolloutViewSet, WebhookEndpointViewSet
from fleet.api.shadows import ShadowViewSet

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("rollouts", RolloutViewSet, basename="rollout")
router.register("experiments", ExperimentViewSet, basename="experiment")
router.register("shadows", ShadowViewSet, basename="shadow")
router.register("webhooks", WebhookEndpointViewSet, basename="webhook")

urlpatterns = router.urls
