"""Live updates: services publish after commit, the websocket relays to subscribed users only."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.db import transaction

from frontend.consumers import parse_topics
from frontend.events import publish, topics_for_event

IN_MEMORY = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


@pytest.fixture
def memory_layer(settings: Any) -> Any:
    from channels.layers import channel_layers

    settings.CHANNEL_LAYERS = IN_MEMORY
    channel_layers.backends.clear()
    yield channel_layers["default"]
    channel_layers.backends.clear()


def test_topics_are_parsed_and_checked() -> None:
    assert parse_topics(b"topics=fleet,rollout-3,bad%20topic,fleet,job-12") == [
        "fleet",
        "rollout-3",
        "job-12",
    ]
    assert parse_topics(b"") == []
    assert parse_topics(b"topics=" + b",".join(b"t%d" % i for i in range(40))) == [f"t{i}" for i in range(12)]


def test_app_events_map_to_list_and_object_topics() -> None:
    assert topics_for_event("rollout.wave_started", {"rollout_id": 4}) == ["rollouts", "rollout-4", "fleet"]
    assert topics_for_event("federated_round.status", {"job": 2, "round": 3}) == ["federated", "job-2"]
    assert topics_for_event("model_version.created", {"id": 1}) == []
    assert topics_for_event("group.release_set", {"group_id": 5}) == ["fleet", "group-5"]


def test_publish_rejects_bad_topic_names() -> None:
    with pytest.raises(ValueError):
        publish("no spaces allowed", {})


@pytest.mark.django_db(transaction=True)
def test_publish_waits_for_commit_and_is_dropped_on_rollback(memory_layer: Any) -> None:
    async def subscribe() -> str:
        name = await memory_layer.new_channel()
        await memory_layer.group_add("fleet", name)
        return name

    async def receive(name: str) -> Any:
        try:
            return await asyncio.wait_for(memory_layer.receive(name), timeout=0.5)
        except TimeoutError:
            return None

    channel = async_to_sync(subscribe)()
    with pytest.raises(RuntimeError), transaction.atomic():
        publish("fleet", {"n": 1})
        raise RuntimeError("the write failed")
    assert async_to_sync(receive)(channel) is None
    with transaction.atomic():
        publish("fleet", {"n": 2})
        # Not sent while the transaction is open: a page would read rows not yet visible.
        assert async_to_sync(receive)(channel) is None
    message = async_to_sync(receive)(channel)
    assert message == {"type": "live.event", "topic": "fleet", "payload": {"n": 2}}


@pytest.mark.django_db(transaction=True)
def test_enrolling_a_device_notifies_the_fleet_topic(memory_layer: Any) -> None:
    from django.utils import timezone

    from fleet.services.enrollment import device_enroll, enrollment_token_create

    async def subscribe() -> str:
        name = await memory_layer.new_channel()
        await memory_layer.group_add("fleet", name)
        return name

    channel = async_to_sync(subscribe)()
    _, token = enrollment_token_create(actor=None, expires_at=timezone.now() + timedelta(hours=1))
    device, _ = device_enroll(token=token, name="cam-1", hardware={"arch": "aarch64"})

    async def receive() -> Any:
        return await asyncio.wait_for(memory_layer.receive(channel), timeout=2)

    message = async_to_sync(receive)()
    assert message["payload"] == {"device": str(device.pk), "change": "enrolled"}


class Socket:
    """A websocket client speaking ASGI to the consumer directly (what a browser's socket becomes)."""

    def __init__(self, app: Any, query: str, user: Any) -> None:
        from asgiref.testing import ApplicationCommunicator

        scope = {"type": "websocket", "path": "/ws/live/", "query_string": query.encode(), "user": user}
        self.comm = ApplicationCommunicator(app, scope)

    async def connect(self) -> tuple[bool, int | None]:
        await self.comm.send_input({"type": "websocket.connect"})
        answer = await self.comm.receive_output(2)
        return answer["type"] == "websocket.accept", answer.get("code")

    async def receive_json(self) -> Any:
        answer = await self.comm.receive_output(2)
        return json.loads(answer["text"])

    async def send_json(self, body: Any) -> None:
        await self.comm.send_input({"type": "websocket.receive", "text": json.dumps(body)})

    async def receive_nothing(self) -> bool:
        return await self.comm.receive_nothing(0.2)

    async def close(self) -> None:
        await self.comm.send_input({"type": "websocket.disconnect", "code": 1000})
        await self.comm.wait(1)


@pytest.mark.django_db(transaction=True)
def test_consumer_relays_events_to_signed_in_viewers_only(memory_layer: Any, make_user: Any) -> None:
    from django.contrib.auth.models import AnonymousUser, Group

    from frontend.consumers import LiveConsumer

    # A transactional test starts from an empty database: the role groups are recreated.
    for role in ("viewer", "operator", "admin"):
        Group.objects.get_or_create(name=role)
    viewer = make_user("viewer")
    nobody = make_user(None)
    event = {"type": "live.event", "topic": "rollout-7", "payload": {"x": 1}}

    async def scenario() -> dict[str, Any]:
        app = LiveConsumer.as_asgi()
        anonymous = await Socket(app, "topics=fleet", AnonymousUser()).connect()
        roleless = await Socket(app, "topics=fleet", nobody).connect()
        socket = Socket(app, "topics=fleet,rollout-7", viewer)
        connected = await socket.connect()
        hello = await socket.receive_json()
        await memory_layer.group_send("rollout-7", event)
        relayed = await socket.receive_json()
        await memory_layer.group_send("rollout-8", {**event, "topic": "rollout-8"})
        nothing = await socket.receive_nothing()
        await socket.send_json({"type": "ping"})
        pong = await socket.receive_json()
        await socket.close()
        return {
            "anonymous": anonymous,
            "roleless": roleless,
            "connected": connected,
            "hello": hello,
            "event": relayed,
            "nothing": nothing,
            "pong": pong,
        }

    result = async_to_sync(scenario)()
    assert result["anonymous"] == (False, 4403)
    assert result["roleless"] == (False, 4403)
    assert result["connected"] == (True, None)
    assert result["hello"] == {"type": "hello", "topics": ["fleet", "rollout-7"]}
    assert result["event"] == {"type": "event", "topic": "rollout-7", "payload": {"x": 1}}
    assert result["nothing"] is True
    assert result["pong"] == {"type": "pong"}
