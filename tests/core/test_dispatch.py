"""core.dispatch: tasks leave after the commit; a broker that is down loses no work."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import pytest
from celery import current_app
from django.conf import settings
from django.db import transaction

from core import dispatch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def sent(monkeypatch: Any) -> list[tuple[str, list[Any], Any]]:
    calls: list[tuple[str, list[Any], Any]] = []
    monkeypatch.setattr(
        current_app, "send_task", lambda name, args, countdown=None: calls.append((name, args, countdown))
    )
    return calls


def test_the_message_leaves_after_the_commit(transactional_db: Any, sent: list[Any]) -> None:
    with transaction.atomic():
        dispatch.enqueue_on_commit("fleet.rollouts_advance_one", 7)
        assert sent == []  # a worker must never look for a row that is not committed
    assert sent == [("fleet.rollouts_advance_one", [7], None)]


def test_nothing_is_sent_for_a_rolled_back_write(transactional_db: Any, sent: list[Any]) -> None:
    with transaction.atomic():
        dispatch.enqueue_on_commit("fleet.rollouts_advance_one", 7)
        transaction.set_rollback(True)
    assert sent == []


def test_a_broker_that_is_down_is_logged_not_raised(
    transactional_db: Any, monkeypatch: Any, caplog: Any
) -> None:
    def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("connection refused")

    monkeypatch.setattr(current_app, "send_task", down)
    with caplog.at_level(logging.WARNING, logger="core.dispatch"):
        dispatch.enqueue_on_commit("fleet.webhooks_deliver", 3)  # outside a transaction: at once
    assert "fleet.webhooks_retry_due will recover it" in caplog.text


def test_a_task_without_a_recovery_cannot_be_enqueued() -> None:
    with pytest.raises(ValueError, match="no declared recovery"):
        dispatch.enqueue_on_commit("fleet.something_new", 1)
    with pytest.raises(ValueError, match="no declared recovery"):
        dispatch.enqueue_group_on_commit("fleet.something_new", [[1], [2]])


def test_a_group_leaves_after_the_commit_as_one_message_per_argument_list(
    transactional_db: Any, monkeypatch: Any
) -> None:
    from celery import canvas

    groups: list[list[tuple[str, list[Any]]]] = []
    monkeypatch.setattr(
        canvas.group,
        "apply_async",
        lambda self, *a, **k: groups.append([(t.task, list(t.args)) for t in self.tasks]),
    )
    with transaction.atomic():
        dispatch.enqueue_group_on_commit("training.shard_aggregate", [[4], [5], [6]])
        assert groups == []
    assert groups == [[("training.shard_aggregate", [i]) for i in (4, 5, 6)]]


def test_a_group_the_broker_refuses_is_logged_not_raised(
    transactional_db: Any, monkeypatch: Any, caplog: Any
) -> None:
    from celery import canvas

    def down(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("connection refused")

    monkeypatch.setattr(canvas.group, "apply_async", down)
    with caplog.at_level(logging.WARNING, logger="core.dispatch"):
        dispatch.enqueue_group_on_commit("training.shard_aggregate", [[1], [2]])
    assert "group of 2 training.shard_aggregate" in caplog.text
    assert "core.sweep will recover it" in caplog.text


def test_every_recovery_is_a_periodic_task_that_exists() -> None:
    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    current_app.loader.import_default_modules()
    for recovery in dispatch.recoveries().values():
        assert recovery.by in scheduled, (
            f"{recovery.task} is recovered by {recovery.by}, which beat never runs"
        )
        assert recovery.task in current_app.tasks, f"no task named {recovery.task}"


def test_every_task_the_code_sends_has_a_recovery() -> None:
    used: set[str] = set()
    for package in ("core", "fleet", "models_registry", "training", "frontend", "config"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", getattr(node.func, "attr", ""))
                    in ("enqueue_on_commit", "send_now", "enqueue_group_on_commit", "send_group_now")
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                ):
                    used.add(str(node.args[0].value))
    assert used, "the scan found no call"
    assert used - set(dispatch.recoveries()) == set()
