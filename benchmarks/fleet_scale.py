"""A fleet of 100,000 boards heartbeating at their real interval, against the production web tier.

    python -m benchmarks.fleet_scale [--devices N] [--interval S] [--minutes M] [--json]
                                     [--connections C] [--quick]

What it does, all in one run on this machine:

1. a scratch database: on the PostgreSQL server of ``DATABASE_URL`` when it names one (a
   database of its own, created and dropped by the run), otherwise a SQLite file; an
   embedded Redis-protocol server or ``REDIS_URL``; migrated;
2. ``--devices`` devices in service: each with a real secret (the server stores its keyed
   hash, exactly as enrollment does), online, seen a moment ago, in one group;
3. the web tier as production runs it: gunicorn, 2 workers x 4 threads, the production
   settings (``config.runner.wsgi_command``); and Celery beat with one worker on the
   ``control`` queue, which writes the heartbeats' buffered ``last_seen`` to the rows
   (``fleet.liveness_flush``) and marks silent devices offline, as in production;
4. a light heartbeat generator in this process (not full agents): ``--connections``
   keep-alive HTTP/1.1 connections over raw sockets, each owning a slice of the fleet,
   sending every device's ``POST /api/agent/v1/heartbeat`` once per ``--interval`` seconds
   at its own offset, so the fleet's load is spread evenly as a real one's is;
5. measured after a warm-up of one interval, for ``--minutes``: heartbeats per second,
   latency p50/p99 (write to last byte), errors by status, how far the generator fell
   behind its schedule (if it did, the rate is the server's limit, not the fleet's),
   database writes per second (PostgreSQL's own row counters; not available on SQLite),
   the web processes' RSS, and how many of the (all live) devices are offline at the end.

The target rate is devices / interval (1,667/s for 100,000 at 60 s). The generator shares the
machine's two cores with the server, so on this machine the server gets about one core.

With ``--json`` the last line is one JSON object with ``devices``, ``heartbeats_per_s``,
``target_per_s``, ``p50_ms``, ``p99_ms``, ``errors``, ``db_writes_per_s``, ``web_rss_mb``,
``lag_p99_s`` and ``offline_at_end``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

HOST = "127.0.0.1"
PATH = "/api/agent/v1/heartbeat"


@dataclass
class Window:
    """What the measured window saw."""

    requests: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    def percentile(self, values: list[float], q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _scratch_postgres(url: str) -> tuple[str, str]:
    """A database of this run's own on the server of `url`: (its URL, its name)."""
    import psycopg

    name = f"flotilla_fleet_scale_{os.getpid()}"
    base, _, _ = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base}/{name}", name


def _drop_postgres(url: str, name: str) -> None:
    import psycopg

    base, _, _ = url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _fleet(n: int) -> list[str]:
    """`n` devices in service with real secrets; returns the secrets."""
    from django.db import connections
    from django.utils import timezone

    from fleet.auth import hash_secret, new_secret
    from fleet.models import Device, DeviceGroup

    group = DeviceGroup.objects.create(name="fleet-scale")
    secrets = [new_secret() for _ in range(n)]
    now = timezone.now()
    through = Device.groups.through
    for start in range(0, n, 5000):
        rows = Device.objects.bulk_create(
            [
                Device(
                    name=f"scale-{i:06d}",
                    secret_hash=hash_secret(secrets[i]),
                    status=Device.Status.ONLINE,
                    last_seen=now,
                    arch="aarch64",
                    cores=4,
                    ram_mb=2048,
                    agent_version="1.0.0",
                    tags=["scale"],
                )
                for i in range(start, min(n, start + 5000))
            ]
        )
        through.objects.bulk_create([through(device_id=d.pk, devicegroup_id=group.pk) for d in rows])
    connections.close_all()
    return secrets


def _db_rows_written() -> int | None:
    """PostgreSQL's count of rows inserted, updated and deleted in this database so far."""
    from django.db import connection

    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT tup_inserted + tup_updated + tup_deleted FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
        return int(cursor.fetchone()[0])


def _offline() -> int:
    """Devices marked offline (every device of the run heartbeats, so 0 unless one was wrongly)."""
    from fleet.models import Device

    return Device.objects.filter(status=Device.Status.OFFLINE).count()


def _request(secret: str, seq: int) -> bytes:
    body = json.dumps(
        {
            "seq": seq,
            "agent_version": "1.0.0",
            "state": {"charging": True, "idle": True, "battery_percent": 80.0, "local_examples": 120},
        }
    ).encode()
    return (
        f"POST {PATH} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Device {secret}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return int(head[9:12]), head


async def _connection(
    port: int,
    secrets: list[str],
    offsets: list[float],
    interval: float,
    start: float,
    measure_from: float,
    stop_at: float,
    window: Window,
) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    seqs = [1] * len(secrets)
    # Each device's next due time; the list is in offset order, so one pointer walks it.
    round_no, k = 0, 0
    try:
        while True:
            due = start + offsets[k] + round_no * interval
            now = time.perf_counter()
            # A generator that fell behind stops with the window too, not when it caught up.
            if due >= stop_at or now >= stop_at:
                return
            if due > now:
                await asyncio.sleep(due - now)
            sent = time.perf_counter()
            seqs[k] += 1
            writer.write(_request(secrets[k], seqs[k]))
            status, head = await _read_answer(reader)
            done = time.perf_counter()
            if sent >= measure_from:
                window.requests += 1
                window.latencies.append(done - sent)
                window.lags.append(max(0.0, sent - due))
                window.statuses[status] = window.statuses.get(status, 0) + 1
                if status != 200:
                    window.errors += 1
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
            k += 1
            if k == len(secrets):
                k, round_no = 0, round_no + 1
    finally:
        writer.close()


async def _load(
    *, port: int, secrets: list[str], connections: int, interval: float, warmup: float, seconds: float
) -> Window:
    window = Window()
    n = len(secrets)
    start = time.perf_counter() + 1.0
    measure_from, stop_at = start + warmup, start + warmup + seconds
    tasks = []
    for c in range(connections):
        mine = list(range(c, n, connections))
        tasks.append(
            _connection(
                port,
                [secrets[i] for i in mine],
                [interval * i / n for i in mine],
                interval,
                start,
                measure_from,
                stop_at,
                window,
            )
        )
    await asyncio.gather(*tasks)
    return window


def _rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return (
        process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
    ) / 1e6


def run(*, devices: int, interval: float, seconds: float, connections: int) -> dict[str, Any]:
    from config.stack import Stack

    url = os.environ.get("DATABASE_URL", "")
    scratch: tuple[str, str] | None = None
    options: dict[str, Any] = {}
    if url.startswith(("postgres://", "postgresql://")):
        scratch = _scratch_postgres(url)
        options["database_url"] = scratch[0]
    else:
        # A SQLite file of the run's own, whatever DATABASE_URL says.
        options["database_url"] = ""
        os.environ.pop("DATABASE_URL", None)
    stack = Stack.scratch("flotilla-bench-", production=True, **options)
    try:
        stack.migrate()
        stack.setup_django()
        t0 = time.perf_counter()
        secrets = _fleet(devices)
        setup_s = time.perf_counter() - t0
        web = stack.start_web(server="gunicorn", workers=2, threads=4)
        assert web.process is not None
        stack.start_worker("worker", concurrency=1, queues="control")
        stack.start_beat()
        warmup = min(interval, 60.0)
        written_before = _db_rows_written()
        t_before = time.perf_counter()
        window = asyncio.run(
            _load(
                port=stack.port,
                secrets=secrets,
                connections=connections,
                interval=interval,
                warmup=warmup,
                seconds=seconds,
            )
        )
        written_after = _db_rows_written()
        db_s = time.perf_counter() - t_before
        rss = _rss_mb(web.process.pid)
        offline_at_end = _offline()
    finally:
        stack.close()
        if scratch is not None:
            from django.db import connections as dbs

            dbs.close_all()
            _drop_postgres(url, scratch[1])
    db_writes = (
        round((written_after - written_before) / db_s, 1)
        if written_after is not None and written_before is not None
        else None
    )
    return {
        "devices": devices,
        "interval_s": interval,
        "seconds": seconds,
        "connections": connections,
        "target_per_s": round(devices / interval, 1),
        "heartbeats_per_s": round(window.requests / seconds, 1),
        "p50_ms": round(window.percentile(window.latencies, 0.5) * 1000, 2),
        "p99_ms": round(window.percentile(window.latencies, 0.99) * 1000, 2),
        "errors": window.errors,
        "statuses": window.statuses,
        "lag_p99_s": round(window.percentile(window.lags, 0.99), 3),
        "lag_max_s": round(max(window.lags, default=0.0), 3),
        "db_writes_per_s": db_writes,
        "web_rss_mb": round(rss, 1),
        "offline_at_end": offline_at_end,
        "setup_s": round(setup_s, 1),
        "database": stack.database,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 devices at 10 s for 30 s")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--devices", type=int, default=None, help="devices (100,000)")
    parser.add_argument("--interval", type=float, default=None, help="heartbeat interval, s (60)")
    parser.add_argument("--minutes", type=float, default=None, help="measured minutes (5)")
    parser.add_argument("--connections", type=int, default=64, help="generator connections (64)")
    args = parser.parse_args(argv)
    devices = args.devices or (2000 if args.quick else 100_000)
    interval = args.interval or (10.0 if args.quick else 60.0)
    seconds = (args.minutes * 60) if args.minutes else (30.0 if args.quick else 300.0)
    load_before = os.getloadavg()[0]
    r = run(devices=devices, interval=interval, seconds=seconds, connections=args.connections)
    print(
        f"\nFleet scale: {devices:,} devices every {interval:g} s, {seconds:g} s measured, gunicorn 2x4 "
        f"({r['database']}; load {load_before:.1f} before, {os.getloadavg()[0]:.1f} after)\n"
    )
    met = r["heartbeats_per_s"] >= 0.99 * r["target_per_s"] and r["p99_ms"] <= 100 and r["errors"] == 0
    rows = [
        ("heartbeats/s", f"{r['heartbeats_per_s']:,}", f"target {r['target_per_s']:,} (devices / interval)"),
        ("p50 / p99 (ms)", f"{r['p50_ms']} / {r['p99_ms']}", "goal p99 <= 100"),
        ("errors", f"{r['errors']}", f"statuses {r['statuses']}"),
        ("generator behind schedule p99 / max (s)", f"{r['lag_p99_s']} / {r['lag_max_s']}", "0 = kept up"),
        ("database rows written/s", f"{r['db_writes_per_s']}", "PostgreSQL's counters (web and beat)"),
        ("web processes RSS (MB)", f"{r['web_rss_mb']}", "gunicorn master + 2 workers"),
        ("devices offline at the end", f"{r['offline_at_end']:,}", "all are live: 0"),
    ]
    width = max(len(name) for name, _, _ in rows)
    print(f"| {'measure'.ljust(width)} | value | note |")
    print(f"|{'-' * (width + 2)}|-------|------|")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value} | {note} |")
    print(f"\ngoals (>= target rate, p99 <= 100 ms, no errors): {'met' if met else 'MISSED'}")
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
