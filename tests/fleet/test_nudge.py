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


def _round_opened(device_ids: list[Any]) -> None:
    emit(
        "federated_round.opened",
        {"job": 1, "round": 1, "round_id": 1, "devices": [str(d) for d in device_ids]},
    )


def test_a_nudge_for_many_devices_reaches_each_of_its_sockets_once(
    live_stack: Any, enroll: Any, settings: Any
) -> None:
    from fleet.consumers import nudge_messages

    # Small batches, so the devices' ids arrive in several fan-out messages.
    settings.NUDGE_BATCH_DEVICES = 2
    chosen, other = [enroll() for _ in range(3)], enroll()
    ids = ["00000000-0000-0000-0000-000000000000", *(a.device.pk for a in chosen)]
    assert len(nudge_messages([str(i) for i in ids], "training_round", batch=2)) == 2

    sockets = [_connect(live_stack, a.secret) for a in chosen]
    # A device with two sockets open (an agent reconnecting) hears it on both.
    sockets.append(_connect(live_stack, chosen[0].secret))
    bystander = _connect(live_stack, other.secret)
    try:
        _round_opened(ids)
        for socket in sockets:
            assert json.loads(socket.recv(timeout=10)) == {"type": "nudge", "reason": "training_round"}
            with pytest.raises(TimeoutError):
                socket.recv(timeout=0.3)
        with pytest.raises(TimeoutError):
            bystander.recv(timeout=0.5)
    finally:
        for socket in [*sockets, bystander]:
            socket.close()


def test_a_closed_socket_is_forgotten_and_a_new_one_hears_the_next_nudge(
    live_stack: Any, enroll: Any
) -> None:
    agent = enroll()
    with _connect(live_stack, agent.secret):
        pass
    with _connect(live_stack, agent.secret) as socket:
        _deployment_opened(agent.device.pk)
        assert json.loads(socket.recv(timeout=10)) == {"type": "nudge", "reason": "desired_version"}
