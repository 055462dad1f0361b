from rest_framework.routers import DefaultRouter

from training.api.views import FederatedJobViewSet

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("federated-jobs", FederatedJobViewSet, basename="federated-job")

urlpatterns = router.urls
