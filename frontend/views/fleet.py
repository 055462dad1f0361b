"""Overview, devices, a device, enrollment and the audit log."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.contrib import messages
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone

from core.api import ServiceError
from core.audit.selectors import audit_event_list
from core.roles import ADMIN, OPERATOR, has_role
from fleet.agent_setup import agent_run_command
from fleet.models import DeviceGroup, EnrollmentToken, UpdatePolicy
from fleet.selectors.devices import device_list
from fleet.services.commands import COMMAND_KINDS, device_command_create
from fleet.services.enrollment import enrollment_token_create, enrollment_token_revoke
from fleet.services.releases import group_release_set
from frontend import selectors
from frontend.events import topic_for
from frontend.views.base import action, capped_page, int_or_none, page, remote_addr, render_page

DEVICES_PER_PAGE = 50
# How many devices past a page's start the list counts: twenty pages ahead.
DEVICE_COUNT_LOOKAHEAD = 1000
DEVICE_FILTERS = ("status", "group", "tag", "version", "search")


@page()
def overview(request: HttpRequest) -> HttpResponse:
    return render_page(
        request,
        "frontend/overview.html",
        section="overview",
        title="Overview",
        **selectors.overview_data(),
    )


@page()
def devices(request: HttpRequest) -> HttpResponse:
    filters = {key: request.GET.get(key, "").strip() for key in DEVICE_FILTERS}
    if filters["version"] and int_or_none(filters["version"]) is None:
        filters["version"] = ""
    queryset = device_list(filters={k: v for k, v in filters.items() if v})
    page_obj = capped_page(
        queryset, per_page=DEVICES_PER_PAGE, number=request.GET.get("page"), lookahead=DEVICE_COUNT_LOOKAHEAD
    )
    query = request.GET.copy()
    query.pop("page", None)
    return render_page(
        request,
        "frontend/devices.html",
        section="devices",
        title="Devices",
        page_obj=page_obj,
        filters=filters,
        query=query.urlencode(),
        choices=selectors.device_filter_choices(),
    )


@page()
def device(request: HttpRequest, device_id: Any) -> HttpResponse:
    found = selectors.device_detail(device_id=device_id)
    if found is None:
        raise Http404("No such device.")
    return render_page(
        request,
        "frontend/device.html",
        section="devices",
        title=found.name,
        device=found,
        deployments=selectors.device_deployments(device=found),
        commands=selectors.device_commands(device=found),
        charts=selectors.device_metric_charts(device=found),
        **selectors.device_drift(device=found),
        learning=selectors.device_learning(device=found),
        command_kinds=COMMAND_KINDS,
        device_topic=topic_for("device", found.pk.hex),
    )


@action(OPERATOR)
def device_command(request: HttpRequest, device_id: Any) -> HttpResponse:
    found = selectors.device_detail(device_id=device_id)
    if found is None:
        raise Http404("No such device.")
    try:
        command = device_command_create(
            actor=request.user,
            device=found,
            kind=request.POST.get("kind", ""),
            remote_addr=remote_addr(request),
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(
            request, f"Command {command.kind} queued; the device picks it up at its next heartbeat."
        )
    return redirect("frontend:device", device_id=found.pk)


@page()
def enrollment(request: HttpRequest) -> HttpResponse:
    # The token itself is shown once, right after it was created, then dropped from the session.
    created = request.session.pop("flotilla_new_token", None)
    return render_page(
        request,
        "frontend/enrollment.html",
        section="enrollment",
        title="Enrollment",
        tokens=EnrollmentToken.objects.select_related("group", "created_by").order_by("-created_at")[:100],
        groups=DeviceGroup.objects.select_related("policy", "release_version__family").order_by("name"),
        policies=UpdatePolicy.objects.order_by("name"),
        created=created,
        now=timezone.now(),
    )


def agent_command(*, token: str, server_url: str) -> str:
    """The copy-paste line that starts a board's agent and enrolls it with a fresh token."""
    return agent_run_command(server_url=server_url, token=token, state_dir="/var/lib/flotilla-agent")


@action(OPERATOR)
def enrollment_token_new(request: HttpRequest) -> HttpResponse:
    group_id = int_or_none(request.POST.get("group"))
    group = DeviceGroup.objects.filter(pk=group_id).first() if group_id else None
    tags = [t for t in request.POST.get("tags", "").replace(",", " ").split() if t]
    hours = int_or_none(request.POST.get("expires_hours")) or 24
    try:
        token, secret = enrollment_token_create(
            actor=request.user,
            name=request.POST.get("name", "").strip(),
            group=group,
            tags=tags,
            max_uses=int_or_none(request.POST.get("max_uses")) or 1,
            expires_at=timezone.now() + timedelta(hours=max(1, hours)),
            remote_addr=remote_addr(request),
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
        return redirect("frontend:enrollment")
    server_url = request.build_absolute_uri("/").rstrip("/")
    request.session["flotilla_new_token"] = {
        "id": token.pk,
        "name": token.name,
        "token": secret,
        "command": agent_command(token=secret, server_url=server_url),
    }
    return redirect("frontend:enrollment")


@action(OPERATOR)
def enrollment_token_revoke_view(request: HttpRequest, token_id: int) -> HttpResponse:
    try:
        enrollment_token_revoke(actor=request.user, token_id=token_id, remote_addr=remote_addr(request))
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "Token revoked.")
    return redirect("frontend:enrollment")


@page(ADMIN)
def audit(request: HttpRequest) -> HttpResponse:
    queryset = audit_event_list().select_related("actor")
    if action_name := request.GET.get("action", "").strip():
        queryset = queryset.filter(action__startswith=action_name)
    if actor := request.GET.get("actor", "").strip():
        queryset = queryset.filter(actor_name=actor)
    page_obj = Paginator(queryset, 50).get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return render_page(
        request,
        "frontend/audit.html",
        section="audit",
        title="Audit log",
        page_obj=page_obj,
        query=query.urlencode(),
        filter_action=action_name,
        filter_actor=actor,
        back=reverse("frontend:audit"),
    )


@action(OPERATOR)
def group_new(request: HttpRequest) -> HttpResponse:
    """Create a device group with the operator API's own validation and audit event."""
    from django.db import transaction

    from core.audit.services import audit_record
    from fleet.api.devices import DeviceGroupSerializer

    data = {
        "name": request.POST.get("name", "").strip(),
        "description": request.POST.get("description", "").strip(),
        "tag_selector": [t for t in request.POST.get("tag_selector", "").replace(",", " ").split() if t],
        "policy": int_or_none(request.POST.get("policy")),
        "canary": request.POST.get("canary") == "on",
    }
    if data["canary"] and not has_role(request.user, ADMIN):
        return HttpResponseForbidden("Marking a group canary needs the admin role.")
    serializer = DeviceGroupSerializer(data=data, context={"request": request})
    if not serializer.is_valid():
        field, errors = next(iter(serializer.errors.items()))
        messages.error(request, f"{field}: {errors[0]}")
        return redirect("frontend:enrollment")
    with transaction.atomic():
        group = serializer.save()
        audit_record(
            actor=request.user,
            action="device_group.create",
            target=group,
            data=data,
            remote_addr=remote_addr(request),
        )
    messages.success(request, f"Group {group.name} created.")
    return redirect("frontend:enrollment")


@page()
def group(request: HttpRequest, group_id: int) -> HttpResponse:
    """A device group: its members, its release (what boards joining it get) and its history."""
    found = selectors.group_detail(group_id=group_id)
    if found is None:
        raise Http404("No such group.")
    return render_page(
        request,
        "frontend/group.html",
        section="enrollment",
        title=f"Group {found['group'].name}",
        group_topic=topic_for("group", found["group"].pk),
        **found,
    )


@action(OPERATOR)
def group_release(request: HttpRequest, group_id: int) -> HttpResponse:
    """Set or (with "clear") clear the group's release through the service the API uses."""
    clear = request.POST.get("clear") == "1"
    version_id = None if clear else int_or_none(request.POST.get("version"))
    if not clear and version_id is None:
        messages.error(request, "Choose a version, or clear the release.")
        return redirect("frontend:group", group_id=group_id)
    try:
        group_release_set(
            actor=request.user,
            group_id=group_id,
            version_id=version_id,
            reason=request.POST.get("reason", "").strip(),
            remote_addr=remote_addr(request),
        )
    except ServiceError as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, "Release cleared." if clear else "Release set.")
    return redirect("frontend:group", group_id=group_id)
