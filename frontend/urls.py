"""Dashboard routes: pages for signed-in users, writes as POSTs that call the apps' services."""

from typing import Any

from django.contrib.auth import views as auth_views
from django.urls import path

from core.logins import RateLimitedLoginView
from frontend.views import fleet, models, operations, training

app_name = "frontend"

urlpatterns: list[Any] = [
    path(
        "login/",
        RateLimitedLoginView.as_view(template_name="frontend/login.html", redirect_authenticated_user=True),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("", fleet.overview, name="overview"),
    path("devices/", fleet.devices, name="devices"),
    path("devices/<uuid:device_id>/", fleet.device, name="device"),
    path("devices/<uuid:device_id>/command", fleet.device_command, name="device-command"),
    path("enrollment/", fleet.enrollment, name="enrollment"),
    path("enrollment/tokens/new", fleet.enrollment_token_new, name="enrollment-token-new"),
    path(
        "enrollment/tokens/<int:token_id>/revoke",
        fleet.enrollment_token_revoke_view,
        name="enrollment-token-revoke",
    ),
    path("enrollment/groups/new", fleet.group_new, name="group-new"),
    path("groups/<int:group_id>/", fleet.group, name="group"),
    path("groups/<int:group_id>/release", fleet.group_release, name="group-release"),
    path("audit/", fleet.audit, name="audit"),
    path("models/", models.models, name="models"),
    path("models/<int:family_id>/", models.family, name="family"),
    path("versions/<int:version_id>/", models.version, name="version"),
    path("versions/<int:version_id>/stage", models.version_stage, name="version-stage"),
    path("versions/<int:version_id>/jobs", models.version_job, name="version-job"),
    path("federated/", training.jobs, name="jobs"),
    path("federated/new", training.job_new, name="job-new"),
    path("federated/<int:job_id>/", training.job, name="job"),
    path("federated/<int:job_id>/<str:verb>", training.job_action, name="job-action"),
    path("rollouts/", operations.rollouts, name="rollouts"),
    path("rollouts/new", operations.rollout_new, name="rollout-new"),
    path("rollouts/<int:rollout_id>/", operations.rollout, name="rollout"),
    path("rollouts/<int:rollout_id>/<str:verb>", operations.rollout_action, name="rollout-action"),
    path("experiments/", operations.experiments, name="experiments"),
    path("experiments/new", operations.experiment_new, name="experiment-new"),
    path("experiments/<int:experiment_id>/", operations.experiment, name="experiment"),
    path(
        "experiments/<int:experiment_id>/<str:verb>", operations.experiment_action, name="experiment-action"
    ),
    path("provisioning/", operations.provisioning, name="provisioning"),
    path("provisioning/new", operations.provisioning_new, name="provisioning-new"),
    path("provisioning/<int:job_id>/", operations.provisioning_job, name="provisioning-job"),
    path(
        "provisioning/<int:job_id>/accept-host-key",
        operations.provisioning_accept_key,
        name="provisioning-accept",
    ),
    path("provisioning/<int:job_id>/cancel", operations.provisioning_cancel, name="provisioning-cancel"),
]
