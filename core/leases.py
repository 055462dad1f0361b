"""Claiming a row for one worker at a time, for a limited time.

Long work (aggregating a round, running a model job, provisioning a board) is a row with
a lifecycle. A worker takes it with one conditional ``UPDATE``: the row must be in a
state that wants work and its lease must be free (never taken, or expired because the
worker holding it died). The new expiry is the worker's token; renewing or finishing
checks the token, so a worker whose lease was taken over learns it (:class:`LeaseLost`)
and writes nothing. A duplicate task delivery finds the lease held and does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import models
from django.db.models import Q
from django.utils import timezone

__all__ = ["Lease", "LeaseLost"]


class LeaseLost(Exception):  # noqa: N818  (the name says what happened)
    """Another worker holds the row now; the caller must stop without writing."""


@dataclass(frozen=True)
class Lease:
    """A lease on rows of ``model``, held in the datetime column ``field`` (its expiry)."""

    model: type[models.Model]
    field: str
    seconds: Callable[[], float]

    def until(self, now: datetime | None = None) -> datetime:
        """The expiry of a lease taken or renewed at ``now``."""
        return (now or timezone.now()) + timedelta(seconds=float(self.seconds()))

    def free(self, now: datetime | None = None) -> Q:
        """Rows nobody holds: never leased, released, or expired."""
        now = now or timezone.now()
        return Q(**{f"{self.field}__isnull": True}) | Q(**{f"{self.field}__lt": now})

    def expired(self, now: datetime | None = None) -> Q:
        """Rows whose holder stopped renewing (a worker that died)."""
        return Q(**{f"{self.field}__lt": now or timezone.now()})

    def claim(self, pk: Any, *, where: Q | None = None, now: datetime | None = None, **updates: Any) -> Any:
        """Take row ``pk`` if it matches ``where`` and is free; write ``updates`` with it.

        Returns the token (the lease's expiry) or None when the row is held, gone or in
        another state.
        """
        now = now or timezone.now()
        token = self.until(now)
        condition = Q(pk=pk) & self.free(now)
        if where is not None:
            condition &= where
        changed = self.model._default_manager.filter(condition).update(**{self.field: token}, **updates)
        return token if changed == 1 else None

    def renew(self, pk: Any, token: Any, **updates: Any) -> Any:
        """Extend the lease (and write ``updates``); raises :class:`LeaseLost` if it was taken."""
        new = self.until()
        changed = self.model._default_manager.filter(pk=pk, **{self.field: token}).update(
            **{self.field: new}, **updates
        )
        if changed != 1:
            raise LeaseLost(f"{self.model.__name__} {pk}: lease lost")
        return new

    def holds(self, pk: Any, token: Any) -> Q:
        """The condition of a write that only the holder of ``token`` may make."""
        return Q(pk=pk, **{self.field: token})

    def release(self, pk: Any, token: Any, **updates: Any) -> bool:
        """Give the row back (and write ``updates``); False when the lease was already lost."""
        changed = self.model._default_manager.filter(self.holds(pk, token)).update(
            **{self.field: None}, **updates
        )
        return changed == 1
