"""Rate limits: one fixed-window counter for every limit of the product, and the client's address.

A limit is a scope (``device``, ``enroll``, ``login``, ...) with a rate from
``settings.RATE_LIMITS`` (``"1200/min"``: that many requests per window of ``s``, ``min``,
``h`` or ``d``), counted per key (a device id, a client address, a user). The counter of
the current window lives in the default cache (Redis in every deployment): one atomic
``INCR`` per request, the window's key expiring with it, so every web process shares it.
When the cache is unreachable the count falls back to this process's memory (a limit per
process is still a limit), and the request is never refused because of the cache.

Refusals are :class:`RateLimited` (a :class:`core.api.ServiceError`): 429 ``rate_limited``
in the one error shape, with ``Retry-After`` the seconds left in the window. The device
API (``fleet.auth``), the login views (``core.logins``) and the operator API's throttle
(``core.throttles.ApiRateThrottle``) all go through :func:`check`.

:func:`client_address` is the caller's address: the socket peer, unless the peer is one of
``settings.TRUSTED_PROXIES`` (CIDRs), in which case the right-most ``X-Forwarded-For``
entry that is not itself a trusted proxy. Entries to its left are whatever the client
wrote and are never believed.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from django.conf import settings
from django.core.cache import cache, caches
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache

from core.api import ServiceError

__all__ = [
    "Rate",
    "RateLimited",
    "check",
    "client_address",
    "parse_rate",
    "redis_client",
    "redis_key",
]

log = logging.getLogger(__name__)

_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
_UNITS |= {"d": 86400, "day": 86400}

# This process's counters when the shared cache cannot be reached.
_local = LocMemCache("flotilla-ratelimit", {"OPTIONS": {"MAX_ENTRIES": 100_000}})


@dataclass(frozen=True)
class Rate:
    """``count`` requests per window of ``period_s`` seconds."""

    count: int
    period_s: int


@lru_cache(maxsize=64)
def parse_rate(text: str) -> Rate | None:
    """``"20/s"``, ``"1200/min"``, ``"10/5min"``; ``""`` or ``"off"`` is no limit (None)."""
    text = text.strip().lower()
    if text in ("", "off", "none", "0"):
        return None
    count, _, per = text.partition("/")
    digits = "".join(c for c in per if c.isdigit())
    unit = per[len(digits) :]
    if not count.strip().isdigit() or unit not in _UNITS:
        raise ValueError(f"a rate looks like 20/s, 1200/min or 10/5min, got {text!r}")
    return Rate(count=int(count), period_s=int(digits or 1) * _UNITS[unit])


class RateLimited(ServiceError):
    """429 ``rate_limited``: come back after ``retry_after_s`` seconds."""

    def __init__(self, *, scope: str, retry_after_s: int) -> None:
        super().__init__(
            f"Too many requests ({scope}); retry after {retry_after_s} s.",
            code="rate_limited",
            status_code=429,
            details={"scope": scope, "retry_after_s": retry_after_s},
            retry_after_s=retry_after_s,
        )


def _counter_client(backend: RedisCache) -> Any:
    """The Redis client kept with the backend for counters (Django's builds one per call)."""
    client = getattr(backend, "_flotilla_counter_client", None)
    if client is None:
        client = backend._cache.get_client(write=True)  # type: ignore[attr-defined]
        backend._flotilla_counter_client = client  # type: ignore[attr-defined]
    return client


def redis_client() -> Any | None:
    """The default cache's Redis client, kept across calls; None when the cache is not Redis.

    For other per-request writes that ride along with the counter (see :func:`check`'s
    ``also``) and the tasks that read them back.
    """
    backend = caches["default"]
    return _counter_client(backend) if isinstance(backend, RedisCache) else None


def redis_key(name: str) -> str:
    """``name`` with the default cache's prefix and version, as the counters' keys have."""
    return str(caches["default"].make_and_validate_key(name))


Queue = Callable[[Any], Any]


def _redis_count(backend: RedisCache, key: str, timeout: int, also: Queue | None) -> int:
    """``INCR`` and ``EXPIRE`` (and whatever ``also`` queues) in one round trip.

    Every device request counts here, so what Django's ``incr`` costs matters: it asks
    ``EXISTS`` before ``INCRBY`` (two round trips) and builds a new client each call.
    ``INCR`` creates a missing counter at 1; the expiry, renewed on each hit, only keeps
    a window's counter a little past its window (the key names the window).
    """
    name = backend.make_and_validate_key(key)
    pipe = _counter_client(backend).pipeline(transaction=False).incr(name).expire(name, timeout)
    if also is not None:
        also(pipe)
    return int(pipe.execute()[0])


def _count(key: str, timeout: int, also: Queue | None = None) -> tuple[int, bool]:
    """Add one to the counter ``key`` (created with ``timeout``): its count, and whether
    ``also``'s commands went to Redis with it."""
    for store in (cache, _local):
        try:
            backend = caches["default"] if store is cache else store
            if isinstance(backend, RedisCache):
                return _redis_count(backend, key, timeout, also), also is not None
            try:
                return int(store.incr(key)), False
            except ValueError:  # no counter for this window yet
                if store.add(key, 1, timeout=timeout):
                    return 1, False
                return int(store.incr(key)), False
        except Exception as exc:  # noqa: BLE001 - an unreachable cache must not refuse requests
            if store is _local:
                log.warning("rate limit counter unavailable: %s", exc)
                return 0, False
            log.debug("shared rate limit counter unavailable, counting locally: %s", exc)
    return 0, False  # pragma: no cover


def _send(also: Queue) -> bool:
    """``also``'s commands alone, in one round trip; False when Redis is not there."""
    client = redis_client()
    if client is None:
        return False
    try:
        pipe = client.pipeline(transaction=False)
        also(pipe)
        pipe.execute()
    except Exception as exc:  # noqa: BLE001 - the caller falls back to its own write
        log.debug("shared cache unavailable: %s", exc)
        return False
    return True


def rate_of(scope: str) -> Rate | None:
    """The configured rate of ``scope`` (None: unlimited)."""
    return parse_rate(str(settings.RATE_LIMITS.get(scope, "")))


def check(scope: str, key: str, *, now: float | None = None, also: Queue | None = None) -> bool:
    """Count one request of ``key`` in ``scope``; :class:`RateLimited` when over the rate.

    ``also(pipeline)`` may queue more Redis commands, sent in the same round trip as the
    counter (before the count is judged, so they are sent for a refused request too).
    Returns whether they reached Redis: False when the cache is not Redis or cannot be
    reached, and the caller does their work another way.
    """
    rate = rate_of(scope)
    if rate is None or not key:
        return _send(also) if also is not None else False
    now = time.time() if now is None else now
    window = int(now // rate.period_s)
    hits, sent = _count(f"rl:{scope}:{key}:{window}", rate.period_s + 1, also)
    if hits > rate.count:
        left = (window + 1) * rate.period_s - now
        raise RateLimited(scope=scope, retry_after_s=max(1, math.ceil(left)))
    return sent


@lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip())


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def client_address(request: Any) -> str | None:
    """The caller's address (see the module docstring); None when there is none."""
    meta = request.META
    peer = _parse_ip(meta.get("REMOTE_ADDR") or "")
    if peer is None:
        return None
    trusted = _networks(tuple(settings.TRUSTED_PROXIES))
    if not trusted or not any(peer in net for net in trusted):
        return str(peer)
    forwarded = [part for part in meta.get("HTTP_X_FORWARDED_FOR", "").split(",") if part.strip()]
    for entry in reversed(forwarded):
        address = _parse_ip(entry)
        if address is None:
            break  # garbage from here on was written by the client: stop at the last good hop
        if not any(address in net for net in trusted):
            return str(address)
        peer = address
    return str(peer)
