"""The device nudge socket: `/ws/agent/`, so a change reaches a board in seconds.

The socket carries no state: a nudge only tells the agent to heartbeat now, and the
heartbeat answer is the source of truth. Devices authenticate with the same
`Authorization: Device <secret>` header as the HTTP API, so no cookie or origin is involved.
"""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from fleet.auth import device_from_authorization


def device_group(device_id: Any) -> str:
    """The channel-layer group a device's socket listens on."""
    return f"device.{device_id}"


def _authorization(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return str(value.decode("latin1"))
    return ""


class AgentNudgeConsumer(AsyncJsonWebsocketConsumer):
    """Accepts authenticated devices and forwards `nudge` events to them."""

    group: str | None = None

    async def connect(self) -> None:
        device = await database_sync_to_async(device_from_authorization)(_authorization(self.scope))
        if device is None:
            await self.close(code=4401)
            return
        self.group = device_group(device.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.group:
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Devices have nothing to say on this socket; anything sent is ignored."""

    async def nudge(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "nudge", "reason": event.get("reason", "")})
