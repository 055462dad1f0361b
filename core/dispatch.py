"""Background work: one way to hand a Celery task to the broker, after the commit.

``enqueue_on_commit("training.round_open", job_id)`` sends the task by name once the
surrounding transaction commits (at once outside one), so a worker never looks for a row
that is not there yet, and no service imports the task module that calls it back.

When the broker is down
    The send is retried briefly by the broker client; if it still fails, the error is
    logged and swallowed, and the write that asked for the work stands. Nothing is lost,
    because every task sent this way is *recoverable*: the rows it works on say that work
    is due (a round still ``collecting`` past its deadline, a model job still ``queued``,
    a webhook delivery still ``pending``), and a periodic task finds them and sends the
    task again. Each app declares, in its ``AppConfig.ready()``, which periodic task
    recovers each of its tasks (:func:`recoverable`); sending a task that nobody
    recovers is refused, so this rule cannot be broken by accident.

Tasks must therefore be safe to run twice: they take ids, and claim their rows with a
conditional update (see :mod:`core.leases`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError, transaction

__all__ = [
    "Recovery",
    "enqueue_group_on_commit",
    "enqueue_on_commit",
    "recoverable",
    "recoveries",
    "run_on_commit",
    "send_group_now",
    "send_now",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recovery:
    """How a lost message for ``task`` is made good: ``by`` (a beat task) finds the work."""

    task: str
    by: str
    how: str


_recoveries: dict[str, Recovery] = {}


def recoverable(task: str, *, by: str, how: str) -> None:
    """Declare that periodic task ``by`` re-sends ``task`` when its message was lost."""
    _recoveries[task] = Recovery(task=task, by=by, how=how)


def recoveries() -> dict[str, Recovery]:
    """Every declared recovery, by task name (the documented list; tests check the beat has them)."""
    return dict(_recoveries)


def _check(task_name: str) -> None:
    if task_name not in _recoveries:
        raise ValueError(
            f"task {task_name!r} has no declared recovery; declare it with core.dispatch.recoverable() "
            "in its app's ready() so a lost message cannot lose the work"
        )


def send_now(task_name: str, *args: Any, countdown: float | None = None) -> bool:
    """Send the task at once; False (logged) when the broker refused it.

    For periodic tasks that re-send work they found in the database: they run outside
    any transaction, and a failure there is retried by their own next run.
    """
    _check(task_name)
    from celery import current_app

    try:
        current_app.send_task(task_name, args=list(args), countdown=countdown)
    except Exception as exc:  # noqa: BLE001 - the broker's errors differ by transport
        logger.warning(
            "could not send %s%s (%s: %s); %s will recover it",
            task_name,
            tuple(args),
            type(exc).__name__,
            exc,
            _recoveries[task_name].by,
        )
        return False
    return True


def enqueue_on_commit(task_name: str, *args: Any, countdown: float | None = None) -> None:
    """Send Celery task ``task_name`` with ``args`` once the current transaction commits.

    Arguments must be JSON-serialisable (ids, not objects). A broker that refuses the
    message is logged, never raised: see the module docstring for how the work is
    recovered. Raises ``ValueError`` at once for a task without a declared recovery.
    """
    _check(task_name)
    transaction.on_commit(lambda: send_now(task_name, *args, countdown=countdown))


def run_on_commit(task_name: str, *args: Any, run: Callable[[], Any]) -> None:
    """Do task ``task_name``'s work in this process once the current transaction commits.

    For a step that is short and on somebody's critical path (the close of a round in the
    request that brought its last answer, the open of the next round in the worker that
    finished the last one): ``run()`` is the task's own service call, so no broker hop
    and no worker pickup sit in between. When ``run()`` raises a database error, the
    task is sent instead (:func:`send_now`); the task's declared recovery still covers
    the work when both are lost (a process killed at the wrong moment).
    """
    _check(task_name)

    def go() -> None:
        try:
            run()
        except DatabaseError as exc:
            logger.warning(
                "%s%s failed in place (%s: %s); sending it to a worker",
                task_name,
                tuple(args),
                type(exc).__name__,
                exc,
            )
            send_now(task_name, *args)

    transaction.on_commit(go)


def send_group_now(task_name: str, arg_lists: list[list[Any]]) -> bool:
    """Send one Celery group of ``task_name``, once per argument list; False (logged) when
    the broker refused it. The tasks run in parallel on any worker; nothing waits for them
    here (there is no result backend): the rows they write say when they are done."""
    _check(task_name)
    if not arg_lists:
        return True
    from celery import current_app, group

    try:
        group(current_app.signature(task_name, args=list(args)) for args in arg_lists).apply_async()
    except Exception as exc:  # noqa: BLE001 - the broker's errors differ by transport
        logger.warning(
            "could not send a group of %d %s (%s: %s); %s will recover it",
            len(arg_lists),
            task_name,
            type(exc).__name__,
            exc,
            _recoveries[task_name].by,
        )
        return False
    return True


def enqueue_group_on_commit(task_name: str, arg_lists: list[list[Any]]) -> None:
    """:func:`enqueue_on_commit` for a group: one message per argument list, sent together
    once the current transaction commits, with the same rules (declared recovery, a refused
    send logged and never raised)."""
    _check(task_name)
    lists = [list(args) for args in arg_lists]
    transaction.on_commit(lambda: send_group_now(task_name, lists))
