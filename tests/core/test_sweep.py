"""core.sweep: one periodic task re-drives every app's leased work; one failing re-drive
does not stop the others."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

import pytest
from celery import current_app
from django.conf import settings

from core import sweep


def test_the_apps_register_their_re_drives_and_beat_runs_the_sweep() -> None:
    assert {"training.rounds", "models_registry.jobs"} <= set(sweep.redrives())
    entry = next(e for e in settings.CELERY_BEAT_SCHEDULE.values() if e["task"] == "core.sweep")
    assert entry["schedule"] == timedelta(seconds=settings.SWEEP_INTERVAL_S)
    current_app.loader.import_default_modules()
    assert "core.sweep" in current_app.tasks


def test_the_sweep_passes_the_grace_and_isolates_a_failing_re_drive(
    monkeypatch: pytest.MonkeyPatch, settings: Any, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[timedelta] = []

    def broken(*, now: datetime, grace: timedelta) -> list[int]:
        raise RuntimeError("database is locked")

    def working(*, now: datetime, grace: timedelta) -> list[int]:
        seen.append(grace)
        return [7]

    monkeypatch.setattr(sweep, "_redrives", {"broken": broken, "working": working})
    settings.SWEEP_GRACE_S = 45
    with caplog.at_level(logging.WARNING, logger="core.sweep"):
        assert sweep.sweep() == {"broken": [], "working": [7]}
    assert seen == [timedelta(seconds=45)]
    assert "re-drive broken failed" in caplog.text and "working re-sent [7]" in caplog.text
