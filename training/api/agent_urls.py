from django.urls import path

from training.api.agent_views import RoundTaskApi, RoundUpdateApi, RoundWeightsApi, rounds_open

urlpatterns = [
    path("rounds/", rounds_open, name="agent-rounds-open"),
    path("rounds/<int:round_id>/task", RoundTaskApi.as_view(), name="agent-round-task"),
    path("rounds/<int:round_id>/weights", RoundWeightsApi.as_view(), name="agent-round-weights"),
    path("rounds/<int:round_id>/update", RoundUpdateApi.as_view(), name="agent-round-update"),
]
