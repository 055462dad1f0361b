"""Writing the audit log. Every operator write calls `audit_record` in its transaction."""

from __future__ import annotations

from typing import Any

from core.audit.models import AuditEvent

# Keys whose values never reach the log, whatever view passes them.
_SECRET_KEYS = {"password", "private_key", "secret", "token", "key", "passphrase"}


def _scrub(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: ("***" if k in _SECRET_KEYS else _scrub(v)) for k, v in data.items()}
    if isinstance(data, list):
        return [_scrub(v) for v in data]
    return data


def actor_label(actor: Any) -> str:
    """How an actor is named in logs and decisions: the username, or "system" for tasks."""
    if getattr(actor, "is_authenticated", False):
        return str(getattr(actor, "username", "") or "system")
    return "system"


def audit_record(
    *,
    actor: Any,
    action: str,
    target: Any = None,
    target_type: str = "",
    target_id: str = "",
    data: dict[str, Any] | None = None,
    remote_addr: str | None = None,
) -> AuditEvent:
    """Record one operator action. `target` (a model instance) fills type and id."""
    if target is not None:
        target_type = target_type or target._meta.label_lower
        target_id = target_id or str(target.pk)
    user = actor if getattr(actor, "is_authenticated", False) else None
    return AuditEvent.objects.create(
        actor=user,
        actor_name=actor_label(user),
        action=action,
        target_type=target_type,
        target_id=target_id,
        data=_scrub(data or {}),
        remote_addr=remote_addr,
    )
