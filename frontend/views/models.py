"""Model families, versions with lineage, evaluation reports and stage changes."""

from __future__ import annotations

from django.contrib import messages
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect

from core.api import ServiceError
from core.roles import ADMIN, OPERATOR, has_role
from frontend import selectors_models
from frontend.events import topic_for
from frontend.selectors_models import version_shadows
from frontend.views.base import action, page, render_page
from models_registry.jobs import OPTIMISE_KINDS, job_enqueue
from models_registry.models import ModelFamily, ModelJob, ModelVersion
from models_registry.selectors import (
    version_children,
    version_get,
    version_latest_evaluation,
    version_lineage,
)
from models_registry.services import STAGE_TRANSITIONS, version_promote


@page()
def models(request: HttpRequest) -> HttpResponse:
    return render_page(
        request,
        "frontend/models.html",
        section="models",
        title="Models",
        families=selectors_models.families(),
    )


@page()
def family(request: HttpRequest, family_id: int) -> HttpResponse:
    found = ModelFamily.objects.filter(pk=family_id).first()
    if found is None:
        raise Http404("No such model family.")
    versions = selectors_models.family_versions(family=found)
    reports = selectors_models.latest_reports(versions=versions)
    return render_page(
        request,
        "frontend/family.html",
        section="models",
        title=f"Model {found.name}",
        family=found,
        contract=selectors_models.family_contract(found),
        rows=selectors_models.variant_rows(versions=versions, reports=reports),
    )


@page()
def version(request: HttpRequest, version_id: int) -> HttpResponse:
    try:
        found = version_get(version_id)
    except ModelVersion.DoesNotExist:
        raise Http404("No such model version.") from None
    report = version_latest_evaluation(found)
    jobs = list(
        ModelJob.objects.filter(version=found).select_related("result_version__family").order_by("-id")[:20]
    )
    return render_page(
        request,
        "frontend/version.html",
        section="models",
        title=found.label,
        version=found,
        lineage=version_lineage(found),
        children=list(version_children(found)),
        artifacts=selectors_models.version_artifacts(found),
        learning=selectors_models.version_learning(found),
        contract=selectors_models.family_contract(found.family),
        judged=selectors_models.evaluation_of(found),
        evaluation=selectors_models.report_view(report),
        next_stages=_next_stages(request, found),
        production_needs_admin=(
            ModelVersion.Stage.PRODUCTION in STAGE_TRANSITIONS.get(found.stage, ())
            and not has_role(request.user, ADMIN)
        ),
        jobs=jobs,
        # The registry's jobs publish no live events: the table polls while one is in flight.
        jobs_active=any(j.status in (ModelJob.Status.QUEUED, ModelJob.Status.RUNNING) for j in jobs),
        optimise_kinds=OPTIMISE_KINDS,
        shadows=version_shadows(found),
        version_topic=topic_for("version", found.pk),
    )


def _next_stages(request: HttpRequest, version: ModelVersion) -> list[str]:
    """The stages the user may move the version to: production only for admins."""
    stages = sorted(STAGE_TRANSITIONS.get(version.stage, ()))
    if has_role(request.user, ADMIN):
        return stages
    return [s for s in stages if s != ModelVersion.Stage.PRODUCTION]


@action(OPERATOR)
def version_stage(request: HttpRequest, version_id: int) -> HttpResponse:
    found = ModelVersion.objects.filter(pk=version_id).first()
    if found is None:
        raise Http404("No such model version.")
    stage = request.POST.get("stage", "")
    if stage == ModelVersion.Stage.PRODUCTION and not has_role(request.user, ADMIN):
        # As in the operator API: production is what every non-canary device may be given.
        return HttpResponseForbidden("Promoting a version to production needs the admin role.")
    try:
        version_promote(version=found, stage=stage, actor=request.user)
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"{found.label} is now {stage}.")
    return redirect("frontend:version", version_id=found.pk)


@action(OPERATOR)
def version_job(request: HttpRequest, version_id: int) -> HttpResponse:
    """Queue an evaluation, an ONNX export or an optimisation of the version."""
    found = ModelVersion.objects.filter(pk=version_id).first()
    if found is None:
        raise Http404("No such model version.")
    kind = request.POST.get("kind", "")
    params: dict[str, object] = {}
    if kind == ModelJob.Kind.OPTIMISE:
        params["kind"] = request.POST.get("optimisation", "")
    try:
        job = job_enqueue(kind=kind, version=found, params=params, actor=request.user)
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"{job.kind} queued for {found.label}.")
    return redirect("frontend:version", version_id=found.pk)
