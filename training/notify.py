"""Wake-ups for devices waiting on ``GET rounds/?wait=``: a Redis pub/sub channel.

A round that opens publishes its id after commit (the ``federated_round.opened`` event's
subscriber, see :mod:`training.subscribers`); every long-poll subscribed to the channel
re-reads its device's tasks. The channel carries no data a device could act on
by itself (the tasks are always read from the database), so a lost message only costs
the poll its timeout.
"""

from __future__ import annotations

import asyncio
import logging
from functools import cache
from typing import Any

import redis
import redis.asyncio as aioredis
from django.conf import settings

logger = logging.getLogger(__name__)

CHANNEL = "flotilla:training:rounds"


@cache
def _client() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def rounds_changed(*, round_id: int) -> None:
    """Tell waiting devices that a round opened (call after commit)."""
    try:
        _client().publish(CHANNEL, str(round_id))
    except redis.RedisError:
        # Devices fall back to their poll timeout; nothing is lost.
        logger.warning("could not publish the opening of round %s", round_id, exc_info=True)


class RoundsListener:
    """An async subscription to the rounds channel, opened before the caller checks its
    tasks so an opening between the check and the wait is never missed."""

    def __init__(self) -> None:
        self._redis: Any = aioredis.Redis.from_url(settings.REDIS_URL)
        self._pubsub: Any = self._redis.pubsub(ignore_subscribe_messages=True)

    async def __aenter__(self) -> RoundsListener:
        await self._pubsub.subscribe(CHANNEL)
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self._pubsub.unsubscribe(CHANNEL)
            await self._pubsub.aclose()
        finally:
            await self._redis.aclose()

    async def wait(self, *, timeout: float) -> bool:
        """True when a round opened within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (left := end - loop.time()) > 0:
            message = await self._pubsub.get_message(timeout=left)
            if message is not None and message.get("type") == "message":
                return True
        return False
