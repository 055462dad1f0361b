"""Operator routes: rollouts, experiments, webhooks."""

from core.api import Router
from fleet.api.rollouts import ExperimentViewSet, RolloutViewSet, WebhookEndpointViewSet

router = Router()
router.register("rollouts", RolloutViewSet, basename="rollout")
router.register("experiments", ExperimentViewSet, basename="experiment")
router.register("webhooks", WebhookEndpointViewSet, basename="webhook")

urlpatterns = router.urls
