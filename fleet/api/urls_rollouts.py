"""Operator routes: rollouts, experiments, shadows, webhooks."""

from core.api import Router
from fleet.api.rollouts import ExperimentViewSet, RolloutViewSet, WebhookEndpointViewSet
from fleet.api.shadows import ShadowViewSet

router = Router()
router.register("rollouts", RolloutViewSet, basename="rollout")
router.register("experiments", ExperimentViewSet, basename="experiment")
router.register("shadows", ShadowViewSet, basename="shadow")
router.register("webhooks", WebhookEndpointViewSet, basename="webhook")

urlpatterns = router.urls
