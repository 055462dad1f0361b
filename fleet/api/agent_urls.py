"""Device API routes of the fleet app (under `/api/agent/v1/`)."""

from django.conf import settings
from django.urls import path

from fleet.api import agent_views
from fleet.api.drift import agent_drift

urlpatterns = [
    path("enroll", agent_views.enroll, name="agent-enroll"),
    path("heartbeat", agent_views.heartbeat, name="agent-heartbeat"),
    path("metrics", agent_views.metrics, name="agent-metrics"),
    path("drift", agent_drift, name="agent-drift"),
    path("artifacts/<str:sha256>", agent_views.artifact, name="agent-artifact"),
    path(
        "deployments/<int:deployment_id>/status",
        agent_views.deployment_status,
        name="agent-deployment-status",
    ),
    path("commands/<int:command_id>/result", agent_views.command_result, name="agent-command-result"),
]

if getattr(settings, "FLOTILLA_BENCH_VIEWS", False):
    # Only for benchmarks/heartbeat.py: the same stack with no work behind it.
    urlpatterns += [
        path("bench/bare", agent_views.bench_bare, name="agent-bench-bare"),
        path("bench/heartbeat-core", agent_views.bench_heartbeat_core, name="agent-bench-heartbeat-core"),
    ]
