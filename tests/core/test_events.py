"""Domain events: delivered after commit, to each subscriber on its own, as documented."""

from __future__ import annotations

import ast
import logging
from pathlib import Path
from typing import Any

import pytest
from django.db import transaction

from core import events
from core.events import EVENT_TYPES, Event, emit, subscribed

ROOT = Path(__file__).resolve().parents[2]
ROLLOUT = {"rollout_id": 1, "name": "r", "version_id": 2, "status": "paused", "wave": 0, "reason": "x"}


def test_an_event_reaches_subscribers_only_after_the_commit(transactional_db: Any) -> None:
    seen: list[Event] = []
    with subscribed(seen.append, names=["rollout.*"]):
        with transaction.atomic():
            emit("rollout.paused", ROLLOUT)
            assert seen == []  # nobody hears of a state that might still roll back
        assert [e.name for e in seen] == ["rollout.paused"]
        assert seen[0].payload == ROLLOUT and seen[0].public


def test_a_rolled_back_write_announces_nothing(transactional_db: Any) -> None:
    seen: list[Event] = []
    with subscribed(seen.append), transaction.atomic():
        emit("rollout.paused", ROLLOUT)
        transaction.set_rollback(True)
    assert seen == []


def test_one_failing_subscriber_does_not_hide_the_event_from_the_others(
    transactional_db: Any, caplog: Any
) -> None:
    seen: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("subscriber bug")

    with (
        subscribed(broken),
        subscribed(lambda e: seen.append(e.name)),
        caplog.at_level(logging.ERROR, logger="core.events"),
    ):
        emit("devices.offline", {"devices": 3})
    assert seen == ["devices.offline"]
    assert "subscriber bug" in caplog.text or "failed on devices.offline" in caplog.text


def test_patterns_select_the_events_a_subscriber_receives(transactional_db: Any) -> None:
    seen: list[str] = []
    with subscribed(lambda e: seen.append(e.name), names=["experiment.*", "device.enrolled"]):
        emit("rollout.paused", ROLLOUT)
        emit("device.enrolled", {"device": "d"})
        emit("experiment.started", {"experiment_id": 1, "name": "e", "status": "running", "winner_arm": None})
    assert seen == ["device.enrolled", "experiment.started"]


def test_undocumented_events_and_missing_payload_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="undocumented"):
        emit("rollout.exploded", {})
    with pytest.raises(ValueError, match="lacks payload keys"):
        emit("rollout.paused", {"rollout_id": 1})
    with pytest.raises(ValueError, match="matches no event type"):
        events.subscribe(lambda e: None, names=["nothing.*"])


def test_the_payload_is_a_json_copy(transactional_db: Any) -> None:
    seen: list[Event] = []
    payload: dict[str, Any] = {**ROLLOUT, "metrics": {"when": Path("/x")}}
    with subscribed(seen.append):
        emit("rollout.paused", payload)
    payload["metrics"]["when"] = "changed later"
    assert seen[0].payload["metrics"] == {"when": "/x"}


def test_webhook_receivers_get_public_events_only(transactional_db: Any) -> None:
    from fleet.models import WebhookDelivery, WebhookEndpoint

    WebhookEndpoint.objects.create(url="http://127.0.0.1:9/hook", secret="s" * 20)  # every type
    emit("device.enrolled", {"device": "d"})  # a notice inside the product
    emit("deployment.opened", {"deployment_id": 1, "device_id": "d", "version_id": 1, "nudge": False})
    assert not WebhookDelivery.objects.exists()
    emit("rollout.paused", ROLLOUT)
    assert list(WebhookDelivery.objects.values_list("event_type", flat=True)) == ["rollout.paused"]


def _emitted_names() -> set[str]:
    """Every event name passed literally to ``emit`` (or an ``_event`` helper) in the server code."""
    names: set[str] = set()
    for package in ("core", "fleet", "models_registry", "training", "frontend", "config"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call) or not node.args:
                    continue
                func = node.func
                name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")
                first = node.args[0] if name == "emit" else (node.args[1] if len(node.args) > 1 else None)
                if (
                    name in ("emit", "_event")
                    and isinstance(first, ast.Constant)
                    and isinstance(first.value, str)
                ):
                    names.add(first.value)
    return names


def test_the_documented_event_list_is_the_emitted_one() -> None:
    emitted = _emitted_names()
    # Decision names built at run time by a Step (rollout and experiment actions) count too.
    for path in (ROOT / "fleet" / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "event" and isinstance(node.value, ast.Constant):
                emitted.add(str(node.value.value))
    assert emitted - set(EVENT_TYPES) == set(), "emitted but not documented"
    assert set(EVENT_TYPES) - emitted == set(), "documented but never emitted"


def test_every_documented_event_is_emitted_somewhere() -> None:
    """`emit` refuses a name not in the list; here the other way: no listed name is dead.

    Every name in EVENT_TYPES must appear as a string literal in product code other than
    the list itself (services pass event names as literals, directly or to a helper).
    """
    import ast
    from pathlib import Path

    from core.events import EVENT_TYPES

    root = Path(__file__).resolve().parents[2]
    literals: set[str] = set()
    for package in ("core", "fleet", "models_registry", "training", "frontend", "config"):
        for path in (root / package).rglob("*.py"):
            if "migrations" in path.parts or path == root / "core" / "events.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    literals.add(node.value)
    assert sorted(set(EVENT_TYPES) - literals) == []
