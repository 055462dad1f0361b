"""A heartbeat's pure liveness write, buffered in Redis and flushed to the device rows in bulk.

At a 60 s interval nearly every heartbeat of a quiet board changes nothing but `last_seen`;
100,000 boards would make that 1,667 row UPDATEs a second. Instead the device API's rate
limit (``core.ratelimit.check``), which already sends one pipeline per request, carries one
more command for a heartbeat: ``ZADD GT`` of the server's time under the device's id in one
sorted set (a score only ever moves forward). The heartbeat then writes the row only when
something else changed (status, agent version, reported state), and at once.

:func:`liveness_flush` takes the set's entries in chunks (``ZPOPMIN``) and writes them with
one UPDATE per chunk, each row only forward (never an older time over a newer one) and only
an online device's: a board comes online (or back) through the heartbeat's own write, so an
entry of a pending, offline or decommissioned board (a refused request of one: the entry is
added before the body is read) changes nothing. A chunk the database refused goes back into
the set. Beat runs it
every ``LIVENESS_FLUSH_S``, and ``devices_mark_offline`` runs it first, so the offline
marking and the status counts built on it see every heartbeat the buffer holds; the
`last_seen` the device list shows lags by at most that period.

When Redis cannot be reached the heartbeat writes `last_seen` itself, as it did before the
buffer (at most every ``HEARTBEAT_LAST_SEEN_WRITE_S``); when the flush cannot reach it,
:class:`LivenessUnavailable` says so and the offline marking waits for the next run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connections

from core.ratelimit import redis_client, redis_key
from fleet.models import Device

__all__ = ["LivenessUnavailable", "liveness_flush", "liveness_queue"]

log = logging.getLogger(__name__)

SEEN_KEY = "fleet:last-seen"
FLUSH_CHUNK = 1000


class LivenessUnavailable(RuntimeError):
    """The buffer could not be read (Redis unreachable): what it holds is not flushed yet."""


def liveness_queue(device_id: Any) -> Callable[[Any], Any]:
    """The command that buffers "seen now" for a device, for a Redis pipeline."""
    entry = {str(device_id): time.time()}
    key = redis_key(SEEN_KEY)
    return lambda pipe: pipe.zadd(key, entry, gt=True)


def _write(entries: list[tuple[str, float]]) -> int:
    """One UPDATE of `last_seen` for these (device id, epoch seconds): rows changed."""
    conn = connections[DEFAULT_DB_ALIAS]
    quote = conn.ops.quote_name
    fields = {f.name: f for f in Device._meta.concrete_fields}
    table = quote(Device._meta.db_table)
    pk, status, seen = (quote(fields[name].column) for name in ("id", "status", "last_seen"))
    params: list[Any] = []
    for device_id, ts in entries:
        params.append(fields["id"].get_db_prep_value(device_id, conn))
        params.append(fields["last_seen"].get_db_prep_value(datetime.fromtimestamp(ts, tz=UTC), conn))
    params.append(Device.Status.ONLINE.value)
    if conn.vendor == "postgresql":
        values = ", ".join(["(%s::uuid, %s::timestamptz)"] * len(entries))
        source = f"(VALUES {values}) AS v (id, seen)"
    else:  # SQLite names a VALUES list's columns itself
        values = ", ".join(["(%s, %s)"] * len(entries))
        source = f"(SELECT column1 AS id, column2 AS seen FROM (VALUES {values})) AS v"  # noqa: S608
    # Only names from the model are formatted in; every value is a parameter.
    sql = (
        f"UPDATE {table} SET {seen} = v.seen FROM {source} "  # noqa: S608
        f"WHERE {table}.{pk} = v.id AND {table}.{status} = %s "
        f"AND ({table}.{seen} IS NULL OR {table}.{seen} < v.seen)"
    )
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.rowcount)


def liveness_flush(*, chunk: int = FLUSH_CHUNK) -> int:
    """Write every buffered `last_seen` to its device row; the rows it moved forward.

    Takes at most what the buffer held when it started (heartbeats keep adding), so it
    ends under any load. :class:`LivenessUnavailable` when Redis cannot be reached.
    """
    client = redis_client()
    if client is None:
        return 0  # no shared cache: heartbeats write their rows themselves
    key = redis_key(SEEN_KEY)
    try:
        pending = int(client.zcard(key))
    except Exception as exc:  # noqa: BLE001 - any failure to reach the cache means the same
        raise LivenessUnavailable(str(exc)) from exc
    written, taken = 0, 0
    while taken < pending:
        try:
            popped = client.zpopmin(key, chunk)
        except Exception as exc:  # noqa: BLE001
            raise LivenessUnavailable(str(exc)) from exc
        if not popped:
            break
        taken += len(popped)
        entries = [(m.decode() if isinstance(m, bytes) else str(m), float(ts)) for m, ts in popped]
        try:
            written += _write(entries)
        except Exception:
            # Back into the buffer (never over a newer time), for the next flush.
            client.zadd(key, dict(entries), gt=True)
            raise
    return written
