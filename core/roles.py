"""Roles: viewer < operator < admin, held as Django groups and enforced per endpoint.

A view can raise the bar with `required_role` (all methods) or `write_role` (unsafe
methods). Superusers count as admins.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission

VIEWER = "viewer"
OPERATOR = "operator"
ADMIN = "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)
_RANK = {VIEWER: 1, OPERATOR: 2, ADMIN: 3}


def user_role(user: Any) -> str | None:
    """The highest role a user holds, or None. Cached on the user object per request."""
    if not getattr(user, "is_authenticated", False):
        return None
    if hasattr(user, "_flotilla_role"):
        cached: str | None = user._flotilla_role
        return cached
    role: str | None
    if user.is_superuser:
        role = ADMIN
    else:
        names = set(user.groups.values_list("name", flat=True))
        role = next((r for r in (ADMIN, OPERATOR, VIEWER) if r in names), None)
    user._flotilla_role = role
    return role


def has_role(user: Any, role: str) -> bool:
    """Whether the user holds `role` or a higher one."""
    held = user_role(user)
    return held is not None and _RANK[held] >= _RANK[role]


class RolePermission(BasePermission):
    """Reads need viewer, writes need operator, unless the view asks for more."""

    message = "Your role does not allow this action."

    def has_permission(self, request: Any, view: Any) -> bool:
        if not request.user or not request.user.is_authenticated:
            return False
        required: str | None = getattr(view, "required_role", None)
        if required is None:
            if request.method in SAFE_METHODS:
                required = VIEWER
            else:
                required = getattr(view, "write_role", OPERATOR)
        return has_role(request.user, required)
