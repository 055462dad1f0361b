"""Rollouts, A/B experiments and SSH provisioning."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect

from core.api import ServiceError
from core.roles import ADMIN, OPERATOR
from fleet.models import DeviceGroup, Experiment, ProvisioningJob, Rollout
from fleet.selectors.experiments import experiment_list
from fleet.selectors.rollouts import rollout_list, rollout_summary
from fleet.services import experiments as experiment_services
from fleet.services import provisioning as provisioning_services
from fleet.services import rollouts as rollout_services
from frontend import selectors_rollouts
from frontend.events import topic_for
from frontend.views.base import action, int_or_none, page, remote_addr, render_page
from models_registry.models import Artifact, ModelVersion

ROLLOUT_VERBS: dict[str, Callable[..., Any]] = {
    "start": rollout_services.rollout_start,
    "pause": rollout_services.rollout_pause,
    "resume": rollout_services.rollout_resume,
    "abort": rollout_services.rollout_abort,
    "rollback": rollout_services.rollout_rollback,
}
# Gate fields of the create form: (form field, gate metric, threshold key)
GATE_FIELDS = (
    ("gate_latency_p95_ms_max", "latency_p95_ms", "max"),
    ("gate_error_rate_max", "error_rate", "max"),
    ("gate_accuracy_min", "accuracy", "min"),
    ("gate_accuracy_max_decrease_pct", "accuracy", "max_decrease_pct"),
    ("gate_mae_max", "mae", "max"),
    ("gate_mae_max_increase_pct", "mae", "max_increase_pct"),
)


def _deployable_versions() -> list[ModelVersion]:
    """Versions a rollout or experiment form offers: with ONNX, in production or staging
    (staging only reaches canary groups; the services refuse the rest), not rejected."""
    versions = (
        ModelVersion.objects.filter(
            artifacts__kind=Artifact.Kind.ONNX,
            stage__in=[ModelVersion.Stage.PRODUCTION, ModelVersion.Stage.STAGING],
        )
        .select_related("family")
        .order_by("family__name", "-number")[:200]
    )
    return [v for v in versions if not (v.metrics or {}).get("rejected")]


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------- rollouts


@page()
def rollouts(request: HttpRequest) -> HttpResponse:
    return render_page(
        request,
        "frontend/rollouts.html",
        section="rollouts",
        title="Rollouts",
        rollouts=selectors_rollouts.rollouts(),
        versions=_deployable_versions(),
        groups=DeviceGroup.objects.order_by("name"),
    )


def parse_waves(*, percents: str, soak_s: str) -> list[dict[str, float]]:
    """'1, 10, 50, 100' and a soak time -> the wave list the rollout service validates."""
    soak = _float(soak_s) or 0.0
    waves = []
    for part in percents.replace(";", ",").split(","):
        if part.strip():
            value = _float(part.strip().rstrip("%"))
            if value is None:
                raise ServiceError(f"Wave {part.strip()!r} is not a number.", code="validation_error")
            waves.append({"percent": value, "soak_s": soak})
    return waves


def parse_gates(post: Any) -> list[dict[str, Any]]:
    """The create form's gate fields -> gates; one gate per metric with all its thresholds."""
    gates: dict[str, dict[str, Any]] = {}
    min_samples = int_or_none(post.get("gate_min_samples"))
    min_devices = int_or_none(post.get("gate_min_devices"))
    for field, metric, key in GATE_FIELDS:
        value = _float(post.get(field))
        if value is None:
            continue
        gate = gates.setdefault(metric, {"metric": metric})
        gate[key] = value
        if min_samples:
            gate["min_samples"] = min_samples
        if min_devices:
            gate["min_devices"] = min_devices
    return list(gates.values())


@action(OPERATOR)
def rollout_new(request: HttpRequest) -> HttpResponse:
    post = request.POST
    try:
        data: dict[str, Any] = {
            "name": post.get("name", "").strip(),
            "version": post.get("version"),
            "target_group": int_or_none(post.get("target_group")),
            "target_tags": [t for t in post.get("target_tags", "").replace(",", " ").split() if t],
            "waves": parse_waves(percents=post.get("waves", "100"), soak_s=post.get("soak_s", "0")),
            "gates": parse_gates(post),
            "on_gate_failure": post.get("on_gate_failure") or Rollout.OnGateFailure.PAUSE,
        }
        if data["target_group"] is None:
            data.pop("target_group")
        created = rollout_services.rollout_create(
            actor=request.user, data=data, remote_addr=remote_addr(request)
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect("frontend:rollouts")
    messages.success(request, "Rollout created as a draft; start it when ready.")
    return redirect("frontend:rollout", rollout_id=created.pk)


@page()
def rollout(request: HttpRequest, rollout_id: int) -> HttpResponse:
    found = rollout_list().filter(pk=rollout_id).first()
    if found is None:
        raise Http404("No such rollout.")
    return render_page(
        request,
        "frontend/rollout.html",
        section="rollouts",
        title=found.name or f"Rollout {found.pk}",
        rollout=found,
        summary=rollout_summary(rollout=found),
        rollout_topic=topic_for("rollout", found.pk),
        **selectors_rollouts.rollout_page(rollout=found),
    )


@action(OPERATOR)
def rollout_action(request: HttpRequest, rollout_id: int, verb: str) -> HttpResponse:
    service = ROLLOUT_VERBS.get(verb)
    if service is None:
        raise Http404("Unknown action.")
    kwargs: dict[str, Any] = {
        "rollout_id": rollout_id,
        "actor": request.user,
        "remote_addr": remote_addr(request),
    }
    if verb in ("pause", "abort", "rollback"):
        kwargs["reason"] = request.POST.get("reason", "").strip() or f"{verb} from the dashboard"
    try:
        service(**kwargs)
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Rollout {verb}: done.")
    return redirect("frontend:rollout", rollout_id=rollout_id)


# -------------------------------------------------------------------------- experiments


@page()
def experiments(request: HttpRequest) -> HttpResponse:
    return render_page(
        request,
        "frontend/experiments.html",
        section="experiments",
        title="Experiments",
        experiments=selectors_rollouts.experiments(),
        versions=_deployable_versions(),
        groups=DeviceGroup.objects.order_by("name"),
    )


@action(OPERATOR)
def experiment_new(request: HttpRequest) -> HttpResponse:
    """Two arms: control and a candidate, split by the candidate's share."""
    post = request.POST
    share = _float(post.get("candidate_share")) or 0.5
    data: dict[str, Any] = {
        "name": post.get("name", "").strip(),
        "target_group": int_or_none(post.get("target_group")),
        "arms": [
            {"name": "control", "version_id": post.get("control_version"), "share": round(1 - share, 6)},
            {"name": "candidate", "version_id": post.get("candidate_version"), "share": round(share, 6)},
        ],
    }
    # Empty: the arms' family's primary metric (accuracy, or mae for regression).
    if post.get("primary_metric"):
        data["primary_metric"] = post["primary_metric"]
    for key in ("min_samples_per_arm", "min_devices_per_arm", "min_samples_per_device"):
        if (minimum := int_or_none(post.get(key))) is not None:
            data[key] = minimum
    try:
        created = experiment_services.experiment_create(
            actor=request.user, data=data, remote_addr=remote_addr(request)
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect("frontend:experiments")
    messages.success(request, "Experiment created as a draft; start it when ready.")
    return redirect("frontend:experiment", experiment_id=created.pk)


@page()
def experiment(request: HttpRequest, experiment_id: int) -> HttpResponse:
    found: Experiment | None = experiment_list().filter(pk=experiment_id).first()
    if found is None:
        raise Http404("No such experiment.")
    versions = ModelVersion.objects.select_related("family").in_bulk(
        [int(a["version_id"]) for a in found.arms if str(a.get("version_id", "")).isdigit()]
    )
    return render_page(
        request,
        "frontend/experiment.html",
        section="experiments",
        title=found.name,
        experiment=found,
        versions=versions,
        experiment_topic=topic_for("experiment", found.pk),
        **selectors_rollouts.experiment_page(experiment=found),
    )


@action(OPERATOR)
def experiment_action(request: HttpRequest, experiment_id: int, verb: str) -> HttpResponse:
    common: dict[str, Any] = {
        "experiment_id": experiment_id,
        "actor": request.user,
        "remote_addr": remote_addr(request),
    }
    try:
        if verb == "start":
            experiment_services.experiment_start(**common)
        elif verb == "stop":
            experiment_services.experiment_stop(**common, reason="stopped from the dashboard")
        elif verb == "promote":
            rollout = experiment_services.experiment_promote(**common)
            messages.success(request, "A draft rollout of the winner was created.")
            return redirect("frontend:rollout", rollout_id=rollout.pk)
        else:
            raise Http404("Unknown action.")
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Experiment {verb}: done.")
    return redirect("frontend:experiment", experiment_id=experiment_id)


# ------------------------------------------------------------------------- provisioning


@page()
def provisioning(request: HttpRequest) -> HttpResponse:
    return render_page(
        request,
        "frontend/provisioning.html",
        section="provisioning",
        title="Provisioning",
        jobs=selectors_rollouts.provisioning_jobs(),
        groups=DeviceGroup.objects.order_by("name"),
    )


@action(OPERATOR)
def provisioning_new(request: HttpRequest) -> HttpResponse:
    post = request.POST
    group = DeviceGroup.objects.filter(pk=int_or_none(post.get("group")) or 0).first()
    try:
        job = provisioning_services.provisioning_job_create(
            actor=request.user,
            host=post.get("host", "").strip(),
            port=int_or_none(post.get("port")) or 22,
            username=post.get("username", "").strip(),
            private_key=post.get("private_key") or None,
            password=post.get("password") or None,
            name=post.get("name", "").strip(),
            group=group,
            tags=[t for t in post.get("tags", "").replace(",", " ").split() if t],
            packages=post.get("packages", ""),
            training=post.get("training", ""),
            remote_addr=remote_addr(request),
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect("frontend:provisioning")
    return redirect("frontend:provisioning-job", job_id=job.pk)


@page()
def provisioning_job(request: HttpRequest, job_id: int) -> HttpResponse:
    job = ProvisioningJob.objects.select_related("group", "device", "created_by").filter(pk=job_id).first()
    if job is None:
        raise Http404("No such provisioning job.")
    return render_page(
        request,
        "frontend/provisioning_job.html",
        section="provisioning",
        title=f"Provisioning {job.username}@{job.host}",
        job=job,
        job_topic=topic_for("provisioning", job.pk),
    )


@action(ADMIN)
def provisioning_accept_key(request: HttpRequest, job_id: int) -> HttpResponse:
    try:
        provisioning_services.provisioning_job_accept_host_key(
            actor=request.user,
            job_id=job_id,
            fingerprint=request.POST.get("fingerprint", ""),
            remote_addr=remote_addr(request),
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "Host key trusted; the job carries on.")
    return redirect("frontend:provisioning-job", job_id=job_id)


@action(OPERATOR)
def provisioning_cancel(request: HttpRequest, job_id: int) -> HttpResponse:
    try:
        provisioning_services.provisioning_job_cancel(
            actor=request.user, job_id=job_id, remote_addr=remote_addr(request)
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
    return redirect("frontend:provisioning-job", job_id=job_id)
