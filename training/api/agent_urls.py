from django.urls import path

from training.api.agent_views import (
    round_evaluation,
    round_failure,
    round_task,
    round_update,
    round_weights,
    rounds_open,
)

urlpatterns = [
    path("rounds/", rounds_open, name="agent-rounds-open"),
    path("rounds/<int:round_id>/task", round_task, name="agent-round-task"),
    path("rounds/<int:round_id>/weights", round_weights, name="agent-round-weights"),
    path("rounds/<int:round_id>/update", round_update, name="agent-round-update"),
    path("rounds/<int:round_id>/evaluation", round_evaluation, name="agent-round-evaluation"),
    path("rounds/<int:round_id>/failure", round_failure, name="agent-round-failure"),
]
