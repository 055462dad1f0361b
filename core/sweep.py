"""Re-driving leased work whose message was lost: one periodic sweep for every app.

A broker can lose what it holds (Redis restarted without its append-only file, flushed,
failed over to an empty replica, or a worker that died with a message it had taken). The
rows still say which work is due: a round ``aggregating`` that no worker holds, a model
job ``queued`` that nobody claimed. The ``core.sweep`` task, run by beat every
``SWEEP_INTERVAL_S``, asks every registered re-drive to send such work again.

Each app registers its re-drive in ``AppConfig.ready()`` (core imports no app)::

    sweep.register("training.rounds", rounds_redrive)

A re-drive is called as ``redrive(now=..., grace=...)`` and returns the ids it re-sent.
It re-sends work whose lease expired (its worker died), and work that nobody claimed
within ``grace`` (``SWEEP_GRACE_S``) of becoming due (its message never arrived or was
lost). Work under a live lease is never re-sent; a message that was only slow makes the
task run twice, which the tasks allow (they claim their row with :mod:`core.leases`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any, Protocol

from django.conf import settings
from django.utils import timezone

__all__ = ["Redrive", "grace", "register", "redrives", "sweep"]

logger = logging.getLogger(__name__)


class Redrive(Protocol):
    """Sends again the work of one kind that no live lease holds; returns its ids."""

    def __call__(self, *, now: datetime, grace: timedelta) -> Iterable[Any]: ...


_redrives: dict[str, Callable[..., Iterable[Any]]] = {}


def register(name: str, redrive: Redrive) -> None:
    """Add ``redrive`` to the sweep under ``name`` (registering a name again replaces it)."""
    _redrives[name] = redrive


def redrives() -> dict[str, Callable[..., Iterable[Any]]]:
    """Every registered re-drive, by name."""
    return dict(_redrives)


def grace() -> timedelta:
    """How long due work may wait for a worker to claim it before it is sent again."""
    return timedelta(seconds=float(getattr(settings, "SWEEP_GRACE_S", 120.0)))


def sweep(*, now: datetime | None = None) -> dict[str, list[Any]]:
    """Run every re-drive once; returns what each re-sent, by name.

    Each re-drive is isolated: one that raises (its database table locked, a bug) is
    logged and the others still run; the next sweep tries it again.
    """
    now = now or timezone.now()
    window = grace()
    resent: dict[str, list[Any]] = {}
    for name, redrive in _redrives.items():
        try:
            resent[name] = list(redrive(now=now, grace=window))
        except Exception:
            logger.exception("sweep: re-drive %s failed; the next sweep tries again", name)
            resent[name] = []
        if resent[name]:
            logger.warning("sweep: %s re-sent %s (their messages were lost)", name, resent[name])
    return resent
