"""The device nudge socket through the real server (uvicorn) and the Redis channel layer."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.db import transaction
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from core.events import emit

pytestmark = pytest.mark.django_db(transaction=True)


def _connect(live_stack: Any, secret: str | None) -> ClientConnection:
    headers = {"Authorization": f"Device {secret}"} if secret else {}
    url = live_stack.url.replace("http://", "ws://") + "/ws/agent/"
    return connect(url, additional_headers=headers, open_timeout=10)


def _deployment_opened(device_id: Any) -> None:
    """The event a new deployment emits; the fleet's nudge subscriber answers it."""
    emit(
        "deployment.opened",
        {"deployment_id": 1, "device_id": str(device_id), "version_id": 1, "nudge": True},
    )


def test_device_receives_a_nudge_once_the_change_commits(live_stack: Any, enroll: Any) -> None:
    agent = enroll()
    with _connect(live_stack, agent.secret) as socket:
        with transaction.atomic():
            _deployment_opened(agent.device.pk)
            # Nothing leaves before the commit: a worker must never act on rows it cannot see.
            with pytest.raises(TimeoutError):
                socket.recv(timeout=0.5)
        assert json.loads(socket.recv(timeout=10)) == {"type": "nudge", "reason": "desired_version"}


def test_a_rolled_back_change_sends_no_nudge(live_stack: Any, enroll: Any) -> None:
    agent = enroll()
    with _connect(live_stack, agent.secret) as socket:
        with transaction.atomic():
            _deployment_opened(agent.device.pk)
            transaction.set_rollback(True)
        with pytest.raises(TimeoutError):
            socket.recv(timeout=1.0)


@pytest.mark.parametrize("secret", [None, "not-a-device-secret"])
def test_unknown_devices_are_refused(live_stack: Any, secret: str | None) -> None:
    with pytest.raises(InvalidStatus), _connect(live_stack, secret):
        pass
