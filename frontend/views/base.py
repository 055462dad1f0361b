"""What every dashboard view shares: sign-in and role checks, the nav, service errors."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property, wraps
from typing import Any, TypeVar

from django.contrib.auth.decorators import login_required
from django.core.paginator import Page, Paginator
from django.db.models import QuerySet
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


class CappedPaginator(Paginator):
    """Counts at most `lookahead` rows past the start of the page asked for.

    A count of every matching row costs a scan of them all on a large fleet; this one reads
    no more rows than the page's own offset does, plus the lookahead. ``exact`` is False
    when more rows were left uncounted (the page shows "N+"); pages past the counted ones
    are reached by asking for them, each counting its own lookahead.
    """

    def __init__(self, object_list: QuerySet[Any], per_page: int, *, number: int, lookahead: int) -> None:
        super().__init__(object_list, per_page)
        self.queryset = object_list
        self.limit = (number - 1) * per_page + lookahead

    @cached_property
    def counted(self) -> int:
        """Matching rows, counted up to one past the limit."""
        return int(self.queryset.order_by().values("pk")[: self.limit + 1].count())

    @cached_property
    def count(self) -> int:
        return min(self.counted, self.limit)

    @property
    def exact(self) -> bool:
        return self.counted <= self.limit


def capped_page(queryset: QuerySet[Any], *, per_page: int, number: Any, lookahead: int) -> Page:
    """The page `number` (any input: not a positive number means the first page) of
    `queryset`, counted by a CappedPaginator; past the last page, the last page."""
    wanted = int_or_none(number)
    wanted = wanted if wanted is not None and 0 < wanted <= 1_000_000 else 1
    return CappedPaginator(queryset, per_page, number=wanted, lookahead=lookahead).get_page(wanted)
