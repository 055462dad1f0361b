"""Federated training: jobs, a job's rounds live, and creating and steering jobs."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect

from core.api import ServiceError
from core.roles import OPERATOR
from fleet.models import DeviceGroup
from fleet.selectors.shipping import rollouts_shipped_from_job
from frontend import selectors_training
from frontend.events import topic_for
from frontend.views.base import action, int_or_none, page, remote_addr, render_page
from models_registry.models import ModelVersion
from training import services as training_services
from training.services.shipping import federated_job_ship

JOB_VERBS = {
    "start": training_services.job_start,
    "pause": training_services.job_pause,
    "resume": training_services.job_resume,
    "cancel": training_services.job_cancel,
}


@page()
def jobs(request: HttpRequest) -> HttpResponse:
    return render_page(
        request,
        "frontend/jobs.html",
        section="federated",
        title="Federated training",
        jobs=selectors_training.job_rows(selectors_training.jobs()),
        groups=DeviceGroup.objects.order_by("name"),
        versions=ModelVersion.objects.select_related("family").order_by("family__name", "-number")[:200],
    )


@page()
def job(request: HttpRequest, job_id: int) -> HttpResponse:
    found = selectors_training.job_detail(job_id=job_id)
    if found is None:
        raise Http404("No such federated job.")
    return render_page(
        request,
        "frontend/job.html",
        section="federated",
        title=found.name,
        job=found,
        job_topic=topic_for("job", found.pk),
        groups=DeviceGroup.objects.order_by("name"),
        shipped=rollouts_shipped_from_job(job_id=found.pk),
        **selectors_training.job_page(job=found),
    )


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


@action(OPERATOR)
def job_new(request: HttpRequest) -> HttpResponse:
    post = request.POST
    base = (
        ModelVersion.objects.select_related("family")
        .filter(pk=int_or_none(post.get("base_version")) or 0)
        .first()
    )
    group = DeviceGroup.objects.filter(pk=int_or_none(post.get("target_group")) or 0).first()
    if base is None or group is None:
        messages.error(request, "Choose a base version and a target group.")
        return redirect("frontend:jobs")
    fields: dict[str, Any] = {"name": post.get("name", "").strip()}
    for key in ("rounds", "min_clients", "quorum", "local_epochs", "round_deadline_s"):
        if (value := int_or_none(post.get(key))) is not None:
            fields[key] = value
    for key in ("lr", "clients_fraction"):
        if (number := _float(post.get(key))) is not None:
            fields[key] = number
    for key in ("strategy", "codec"):
        if post.get(key):
            fields[key] = post[key]
    try:
        created = training_services.job_create(
            actor=request.user,
            family=base.family,
            base_version=base,
            target_group=group,
            remote_addr=remote_addr(request),
            **fields,
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect("frontend:jobs")
    messages.success(request, f"Job {created.name} created as a draft; start it when ready.")
    return redirect("frontend:job", job_id=created.pk)


@action(OPERATOR)
def job_action(request: HttpRequest, job_id: int, verb: str) -> HttpResponse:
    service = JOB_VERBS.get(verb)
    if service is None:
        raise Http404("Unknown action.")
    try:
        service(job_id=job_id, actor=request.user, remote_addr=remote_addr(request))
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Job {verb}: done.")
    return redirect("frontend:job", job_id=job_id)


@action(OPERATOR)
def job_ship(request: HttpRequest, job_id: int) -> HttpResponse:
    """The job page's Ship button: the same service as ``POST federated-jobs/<id>/ship/``."""
    post = request.POST
    data: dict[str, Any] = {
        "variant": post.get("variant") or "as_trained",
        "force": post.get("force") == "on",
        "shadow": post.get("shadow", "on") != "off",
    }
    if post.get("target_group"):
        data["target_group"] = post["target_group"]
    if (budget := _float(post.get("latency_budget_us"))) is not None:
        data["latency_budget_us"] = budget
    if (percent := _float(post.get("control_percent"))) is not None:
        data["control_percent"] = percent
    try:
        result = federated_job_ship(
            job_id=job_id, actor=request.user, data=data, remote_addr=remote_addr(request)
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect("frontend:job", job_id=job_id)
    plan = result.plan
    held = plan["boards"]["held_back_count"]
    messages.success(
        request,
        f"Shipping {plan['version']['label']} to {plan['target_group']['name']}: rollout started"
        + (" in shadow" if result.rollout.shadow_id else "")
        + f" with {plan['control']['devices']} control devices"
        + (f"; {held} board(s) left out that cannot run it" if held else "")
        + ".",
    )
    return redirect("frontend:rollout", rollout_id=result.rollout.pk)
