"""The device nudge socket: `/ws/agent/`, so a change reaches a board in seconds.

The socket carries no state: a nudge only tells the agent to heartbeat now, and the
heartbeat answer is the source of truth. Devices authenticate with the same
`Authorization: Device <secret>` header as the HTTP API, so no cookie or origin is involved.

Nudges fan out per process, not per device: a sender publishes one message per batch of
device ids to the group :data:`NUDGE_GROUP`; each websocket process has one router that
hears it and hands the nudge to the sockets of those devices it holds (a dict lookup per
id). A change that concerns 100,000 devices costs the broker a few dozen messages, and each
process one decode per batch, instead of one message per device.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from channels.layers import get_channel_layer

from fleet.auth import device_from_authorization

log = logging.getLogger(__name__)

# The group every websocket process's router listens on.
NUDGE_GROUP = "nudge.fanout"


class _Router:
    """One per event loop (one per process under uvicorn): device id → its open sockets."""

    def __init__(self, layer: Any, sockets: dict[str, set[AgentNudgeConsumer]]) -> None:
        self.layer = layer
        self.sockets = sockets
        self.ready = asyncio.Event()
        self.task = asyncio.ensure_future(self._run())

    def alive(self) -> bool:
        return not self.task.done()

    async def _run(self) -> None:
        channel = await self.layer.new_channel("nudge.router.")
        await self.layer.group_add(NUDGE_GROUP, channel)
        self.ready.set()
        while True:
            message = await self.layer.receive(channel)
            try:
                await self.deliver(message)
            except Exception:  # one bad message must not stop the router
                log.exception("nudge router could not deliver a message")

    async def deliver(self, message: dict[str, Any]) -> None:
        reason = str(message.get("reason", ""))
        for device_id in message.get("devices") or ():
            for socket in list(self.sockets.get(str(device_id), ())):
                await socket.send_json({"type": "nudge", "reason": reason})


_routers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Router] = weakref.WeakKeyDictionary()


async def _router(layer: Any) -> _Router:
    """This loop's router, started on first use (and again if its task ever ended)."""
    loop = asyncio.get_running_loop()
    router = _routers.get(loop)
    if router is None or not router.alive():
        # Created without an await in between, so concurrent connects share one router.
        router = _Router(layer, router.sockets if router is not None else {})
        _routers[loop] = router
    await router.ready.wait()
    return router


def nudge_messages(device_ids: list[str], reason: str, *, batch: int) -> list[dict[str, Any]]:
    """The fan-out messages for a nudge of `device_ids`: one per `batch` ids."""
    return [
        {"type": "nudge.batch", "devices": device_ids[i : i + batch], "reason": reason}
        for i in range(0, len(device_ids), batch)
    ]


def _authorization(scope: dict[str, Any]) -> str:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            return str(value.decode("latin1"))
    return ""


class AgentNudgeConsumer(AsyncJsonWebsocketConsumer):
    """Accepts authenticated devices and forwards `nudge` events to them."""

    # No channel of its own (an alias with no layer configured): the process's router
    # delivers to the socket, so it costs no Redis subscription and no receive task.
    channel_layer_alias = "none"
    device_id: str | None = None
    router: _Router | None = None

    async def connect(self) -> None:
        device = await database_sync_to_async(device_from_authorization)(_authorization(self.scope))
        if device is None:
            await self.close(code=4401)
            return
        self.device_id = str(device.pk)
        self.router = await _router(get_channel_layer())
        self.router.sockets.setdefault(self.device_id, set()).add(self)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.router is not None and self.device_id is not None:
            held = self.router.sockets.get(self.device_id)
            if held is not None:
                held.discard(self)
                if not held:
                    del self.router.sockets[self.device_id]

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Devices have nothing to say on this socket; anything sent is ignored."""
