"""One recorded way to move a rollout or an experiment from one status to the next.

Every operator action on a rollout or an experiment does the same things in the same
order, in one transaction: lock the row (so it never races the periodic task that
advances it), check its status (409 ``invalid_state``), apply the action's own step, bump
the revision when the model has one (so a concurrent advance that read the old revision
changes nothing), save the changed fields, write the decision row with its numbers, the
audit event and the domain event. :func:`transition` is that sequence; each action
supplies only its step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from django.db import models, transaction

from core.api import ConflictError, NotFoundError
from core.audit.services import audit_record

__all__ = ["Step", "transition"]


@dataclass
class Step:
    """What an action did to the locked row: the fields it changed and how to record it."""

    decision: str
    event: str
    fields: list[str]
    reason: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    event_extra: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)  # merged into the audit event's data


class _Decide(Protocol):
    def __call__(
        self,
        obj: Any,
        /,
        *,
        action: str,
        reason: str = "",
        metrics: dict[str, Any] | None = None,
        actor: Any = None,
    ) -> Any: ...


Row = TypeVar("Row", bound=models.Model)


def transition(
    *,
    model: type[Row],
    pk: int,
    allowed: tuple[str, ...],
    actor: Any,
    remote_addr: str | None,
    audit_action: str,
    step: Callable[[Row], Step],
    decide: _Decide,
    announce: Callable[..., None],
    audit_data: dict[str, Any] | None = None,
) -> Row:
    """Run one operator action on row ``pk`` of ``model`` (see the module docstring)."""
    label = str(model._meta.verbose_name).capitalize()
    with transaction.atomic():
        obj = model._default_manager.select_for_update().filter(pk=pk).first()
        if obj is None:
            raise NotFoundError(f"No such {model._meta.verbose_name}.", code="not_found")
        status = getattr(obj, "status")  # noqa: B009  (every model here has one; Row has no attribute)
        if status not in allowed:
            raise ConflictError(
                f"{label} {pk} is {status}; this needs {' or '.join(allowed)}.",
                code="invalid_state",
                details={"status": status},
            )
        done = step(obj)
        fields = list(done.fields)
        if hasattr(obj, "revision"):
            obj.revision += 1
            fields.append("revision")
        obj.save(update_fields=fields)
        decide(obj, action=done.decision, reason=done.reason, metrics=done.metrics, actor=actor)
        audit_record(
            actor=actor,
            action=audit_action,
            target=obj,
            data={**(audit_data or {}), **done.audit},
            remote_addr=remote_addr,
        )
        announce(obj, done.event, **done.event_extra)
    return obj
