"""The dashboard's websocket: browsers subscribe to topics and hear when to refresh."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from core.roles import VIEWER, has_role
from frontend.events import TOPIC_RE

MAX_TOPICS = 12


def parse_topics(query_string: bytes) -> list[str]:
    """Valid, distinct topic names from `?topics=a,b`; invalid names are dropped."""
    values = parse_qs(query_string.decode("latin-1")).get("topics", [])
    topics: list[str] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if TOPIC_RE.match(name) and name not in topics:
                topics.append(name)
    return topics[:MAX_TOPICS]


@database_sync_to_async
def _may_view(user: Any) -> bool:
    # has_role reads the user's groups: a database query, so it runs in a thread.
    return has_role(user, VIEWER)


class LiveConsumer(AsyncJsonWebsocketConsumer):
    """Joins the requested topic groups for a signed-in user holding at least the viewer role.

    It only relays `{"topic", "payload"}` messages; what to refresh is the page's business.
    """

    topics: list[str]

    async def connect(self) -> None:
        self.topics = []
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not await _may_view(user):
            await self.close(code=4403)
            return
        self.topics = parse_topics(self.scope.get("query_string", b""))
        for topic in self.topics:
            await self.channel_layer.group_add(topic, self.channel_name)
        await self.accept()
        await self.send_json({"type": "hello", "topics": self.topics})

    async def disconnect(self, code: int) -> None:
        for topic in self.topics:
            await self.channel_layer.group_discard(topic, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        # Browsers only listen; a ping keeps proxies from closing an idle socket.
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def live_event(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "event", "topic": event["topic"], "payload": event.get("payload", {})})
