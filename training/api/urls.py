from core.api import Router
from training.api.views import FederatedJobViewSet

router = Router()
router.register("federated-jobs", FederatedJobViewSet, basename="federated-job")

urlpatterns = router.urls
