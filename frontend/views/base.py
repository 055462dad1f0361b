"""What every dashboard view shares: sign-in and role checks, the nav, service errors."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseForbidden
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_POST

from core.api import client_ip
from core.roles import ADMIN, OPERATOR, VIEWER, has_role, user_role

View = TypeVar("View", bound=Callable[..., HttpResponse])

# (key, label, url name, role needed to see it)
NAV: tuple[tuple[str, str, str, str], ...] = (
    ("overview", "Overview", "frontend:overview", VIEWER),
    ("devices", "Devices", "frontend:devices", VIEWER),
    ("models", "Models", "frontend:models", VIEWER),
    ("rollouts", "Rollouts", "frontend:rollouts", VIEWER),
    ("experiments", "Experiments", "frontend:experiments", VIEWER),
    ("federated", "Federated", "frontend:jobs", VIEWER),
    ("provisioning", "Provisioning", "frontend:provisioning", VIEWER),
    ("enrollment", "Enrollment", "frontend:enrollment", VIEWER),
    ("audit", "Audit", "frontend:audit", ADMIN),
)


def _forbidden(request: HttpRequest) -> HttpResponse:
    return HttpResponseForbidden("Your role does not allow this action.")


def page(role: str = VIEWER) -> Callable[[View], View]:
    """A page for signed-in users holding `role` or higher; others get a 403."""

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not has_role(request.user, role):
                return _forbidden(request)
            return view(request, *args, **kwargs)

        return login_required(wrapped)  # type: ignore[return-value]

    return decorate


def action(role: str = OPERATOR) -> Callable[[View], View]:
    """A POST-only write for `role` or higher. The role is checked here whatever the page
    showed: a viewer who forges the form gets a 403."""

    def decorate(view: View) -> View:
        @wraps(view)
        def wrapped(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if not has_role(request.user, role):
                return _forbidden(request)
            return view(request, *args, **kwargs)

        return login_required(require_POST(wrapped))  # type: ignore[return-value]

    return decorate


def render_page(
    request: HttpRequest, template: str, *, section: str, title: str, status: int = 200, **context: Any
) -> HttpResponse:
    """Render a page inside the layout, with the nav and what the user may do."""
    user = request.user
    nav = [
        {"key": key, "label": label, "url": reverse(name)}
        for key, label, name, needed in NAV
        if has_role(user, needed)
    ]
    context.update(
        section=section,
        title=title,
        nav=nav,
        role=user_role(user),
        can_operate=has_role(user, OPERATOR),
        is_admin=has_role(user, ADMIN),
    )
    return render(request, template, context, status=status)


def remote_addr(request: HttpRequest) -> str | None:
    """The address the audit log records (behind a trusted proxy, the one it forwarded)."""
    return client_ip(request)


def int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
