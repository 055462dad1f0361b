"""Fixtures shared by the training tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _fresh_process_caches() -> Iterator[None]:
    """Round facts cached per process (the long poll's task bodies) start empty in every
    test: a test database may hand out a row id an earlier test used."""
    from fleet.services.heartbeat import heartbeat_caches_clear

    heartbeat_caches_clear()
    yield
    heartbeat_caches_clear()
