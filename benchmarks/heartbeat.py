"""Heartbeats per second through the real server, against a bare Django view on the same stack.

    python -m benchmarks.heartbeat [--quick] [--json] [--devices N] [--concurrency C]
                                   [--seconds S] [--rounds R] [--threads T]
                                   [--server gunicorn|uvicorn]

What it does, all in one run on this machine:

1. a fresh data directory with a SQLite database (or ``DATABASE_URL`` if set) and an
   embedded Redis-protocol server (or ``REDIS_URL``), migrated;
2. ``--devices`` devices enrolled through the enrollment service (the same code as
   ``POST enroll``), each with its secret;
3. the web server as production runs it, as real processes on loopback with the
   production settings module and two workers (one per core), started by
   ``config.stack.Stack``: ``gunicorn`` (WSGI, ``-k gthread``, 2 workers x ``--threads``
   4, the default; ``config.runner.wsgi_command``) or ``uvicorn`` (ASGI:
   ``config.runner.web_command``, uvloop + httptools, the docker-compose command);
4. a load generator in this process: ``--concurrency`` keep-alive HTTP/1.1 connections
   driven by asyncio over raw sockets (no HTTP library in the measured loop, to leave
   the server as much CPU as possible). Each connection plays a slice of the fleet,
   sending ``POST /api/agent/v1/heartbeat`` for its devices in turn with increasing
   ``seq`` and a realistic state; each device heartbeats every second or two, far more
   often than the 60 s a real board does, so it also exercises the last_seen throttle;
5. the same load against ``POST /api/agent/v1/bench/heartbeat-core`` (the same heartbeat
   without other apps' task providers, to show what they add) and against
   ``POST /api/agent/v1/bench/bare`` (a JSON view doing no work), both mounted only
   because the benchmark sets ``FLOTILLA_BENCH_VIEWS=1``, served by the same server and
   middleware: the bare view is the baseline. The endpoints alternate over ``--rounds``
   rounds and each rate is the median round's.

gunicorn is the default because it measured several times faster than uvicorn for the
same bare view here: Django runs a sync view under ASGI with a thread hop per request.
Latencies are those of a closed loop at saturation, so p50 is roughly
concurrency / throughput (queueing in front of 8 server threads); ``--concurrency 16``
shows the latency with a shorter queue.

The load generator shares the machine's cores with the server, so the absolute rates
are lower than a server alone would reach; the ratio heartbeat/bare is the figure that
compares across machines. Latencies are per request, from write to last byte, measured
after a warm-up; p50/p99 over all requests of the measured window.

With ``--json`` the last line is one JSON object with ``heartbeats_per_s``, ``p50_ms``,
``p99_ms``, ``bare_per_s``, ``ratio`` and the run's parameters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Literal

HOST = "127.0.0.1"


@dataclass
class Phase:
    """What one load phase measured."""

    name: str
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000.0


def _enroll(n: int) -> list[str]:
    """Enroll `n` devices through the service; returns their secrets."""
    from datetime import timedelta

    from django.db import connections
    from django.utils import timezone

    from fleet.services.enrollment import device_enroll, enrollment_token_create

    _, token = enrollment_token_create(
        actor=None,
        name="benchmark",
        tags=["bench"],
        max_uses=n,
        expires_at=timezone.now() + timedelta(hours=2),
    )
    secrets = []
    for i in range(n):
        _, secret = device_enroll(
            token=token,
            name=f"bench-{i:05d}",
            hardware={"arch": "aarch64", "cores": 4, "ram_mb": 2048, "agent_version": "1.0.0"},
            tags=[],
        )
        secrets.append(secret)
    connections.close_all()
    return secrets


def _request(path: str, secret: str, body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Device {secret}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _connection(
    port: int,
    path: str,
    secrets: list[str],
    seqs: dict[str, int],
    phase: Phase,
    measure_from: float,
    stop_at: float,
    limit: int | None = None,
) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        i = 0
        while True:
            now = time.perf_counter()
            if now >= stop_at or (limit is not None and i >= limit):
                return
            secret = secrets[i % len(secrets)]
            i += 1
            seqs[secret] += 1
            body = json.dumps(
                {
                    "seq": seqs[secret],
                    "agent_version": "1.0.0",
                    "state": {
                        "charging": True,
                        "idle": False,
                        "battery_percent": 80.0,
                        "local_examples": 120,
                    },
                }
            ).encode()
            started = time.perf_counter()
            writer.write(_request(path, secret, body))
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            chunked = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                lowered = name.strip().lower()
                if lowered == b"content-length":
                    length = int(value)
                elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                while True:
                    size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            else:
                await reader.readexactly(length)
            finished = time.perf_counter()
            if started >= measure_from:
                phase.requests += 1
                phase.latencies.append(finished - started)
                phase.statuses[status] = phase.statuses.get(status, 0) + 1
                if status != 200:
                    phase.errors += 1
            if b"connection: close" in head.lower():
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
    finally:
        writer.close()


async def _prime(*, port: int, secrets: list[str], concurrency: int) -> None:
    """One heartbeat per device, on `concurrency` connections."""
    phase = Phase(name="prime")
    seqs = dict.fromkeys(secrets, 0)
    slices = [secrets[i::concurrency] for i in range(concurrency)]

    async def one(part: list[str]) -> None:
        await _connection(port, ENDPOINTS["heartbeat"], part, seqs, phase, 0.0, float("inf"), limit=len(part))

    await asyncio.gather(*(one(part) for part in slices if part))
    if phase.errors:
        raise RuntimeError(f"priming heartbeats failed: {phase.statuses}")


async def _load(
    *, port: int, path: str, secrets: list[str], concurrency: int, warmup: float, seconds: float
) -> Phase:
    phase = Phase(name=path)
    seqs = dict.fromkeys(secrets, 0)
    slices = [secrets[i::concurrency] for i in range(concurrency)]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    await asyncio.gather(
        *(_connection(port, path, part, seqs, phase, measure_from, stop_at) for part in slices if part)
    )
    phase.seconds = seconds
    return phase


ENDPOINTS = {
    "heartbeat": "/api/agent/v1/heartbeat",
    "core": "/api/agent/v1/bench/heartbeat-core",
    "bare": "/api/agent/v1/bench/bare",
}


def _merge(name: str, runs: list[Phase]) -> Phase:
    """One phase from several rounds: all latencies, the median round's rate."""
    merged = Phase(name=name)
    for phase in runs:
        merged.errors += phase.errors
        merged.latencies.extend(phase.latencies)
        for status, count in phase.statuses.items():
            merged.statuses[status] = merged.statuses.get(status, 0) + count
    median_rate = statistics.median(p.per_s for p in runs)
    merged.requests = sum(p.requests for p in runs)
    merged.seconds = merged.requests / median_rate if median_rate else 0.0
    return merged


def run(
    *,
    devices: int,
    concurrency: int,
    seconds: float,
    warmup: float,
    server: Literal["uvicorn", "gunicorn"],
    rounds: int,
    threads: int = 4,
) -> dict[str, Any]:
    from config.stack import Stack

    stack = Stack.scratch("flotilla-bench-", production=True, extra_env={"FLOTILLA_BENCH_VIEWS": "1"})
    phases: dict[str, list[Phase]] = {name: [] for name in ENDPOINTS}
    prime_s = 0.0
    try:
        stack.migrate()
        stack.setup_django()
        t0 = time.perf_counter()
        secrets = _enroll(devices)
        enroll_s = time.perf_counter() - t0
        stack.start_web(server=server, workers=2, threads=threads)
        port = stack.port
        # Every device's first heartbeat flips it online (a write and a dashboard event);
        # a fleet in service is past that, so one heartbeat per device comes first.
        primed = time.perf_counter()
        asyncio.run(_prime(port=port, secrets=secrets, concurrency=concurrency))
        prime_s = time.perf_counter() - primed
        # Rounds alternate the endpoints, so a burst of load from elsewhere on the machine
        # hits all of them alike; rates are medians over rounds.
        for _ in range(rounds):
            for name, path in ENDPOINTS.items():
                phases[name].append(
                    asyncio.run(
                        _load(
                            port=port,
                            path=path,
                            secrets=secrets,
                            concurrency=concurrency,
                            warmup=warmup,
                            seconds=seconds,
                        )
                    )
                )
    finally:
        stack.close()
    merged = {name: _merge(name, runs) for name, runs in phases.items()}
    heartbeat = merged["heartbeat"]
    if heartbeat.errors:
        log = stack.log("web")[-3000:]
        print(f"heartbeat errors by status: {heartbeat.statuses}\n{log}", file=sys.stderr)
    return {
        "server": server,
        "devices": devices,
        "concurrency": concurrency,
        "seconds": seconds,
        "enroll_s": round(enroll_s, 2),
        "prime_s": round(prime_s, 2),
        "database": stack.database,
        "phases": merged,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 devices, 3 s per phase")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument(
        "--rounds", type=int, default=None, help="alternating rounds per endpoint (3; quick 1)"
    )
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker (4)")
    parser.add_argument("--server", choices=["uvicorn", "gunicorn"], default="gunicorn")
    args = parser.parse_args(argv)
    devices = args.devices or (200 if args.quick else 2000)
    concurrency = args.concurrency or (32 if args.quick else 64)
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    warmup = 1.0 if args.quick else 2.0

    rounds = args.rounds or (1 if args.quick else 3)
    load_before = os.getloadavg()[0]
    result = run(
        devices=devices,
        concurrency=concurrency,
        seconds=seconds,
        warmup=warmup,
        server=args.server,
        rounds=rounds,
        threads=args.threads,
    )
    load_after = os.getloadavg()[0]
    threads_note = f", {args.threads} threads each" if args.server == "gunicorn" else ""
    phases: dict[str, Phase] = result["phases"]
    hb, core, bare = phases["heartbeat"], phases["core"], phases["bare"]
    ratio = hb.per_s / bare.per_s if bare.per_s else 0.0
    core_ratio = core.per_s / bare.per_s if bare.per_s else 0.0
    print(
        f"heartbeat benchmark: {devices} devices enrolled in {result['enroll_s']} s; "
        f"{concurrency} keep-alive connections; {rounds} round(s) of {seconds:g} s per endpoint "
        f"after {warmup:g} s warm-up each; first heartbeat of every device in {result['prime_s']} s; "
        f"server={args.server} (2 workers{threads_note}); database={result['database']}; "
        f"{os.cpu_count()} CPUs shared by the server and this load generator "
        f"(1-min load average {load_before:.1f} before, {load_after:.1f} after: "
        f"other work on the machine lowers every row alike)"
    )
    header = (
        f"{'endpoint':<34}{'requests':>10}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}{'vs bare':>9}"
    )
    print(header)
    print("-" * len(header))
    rows = (
        (hb, "POST heartbeat"),
        (core, "POST heartbeat, no task providers"),
        (bare, "POST bench/bare (baseline)"),
    )
    for phase, label in rows:
        versus = phase.per_s / bare.per_s if bare.per_s else 0.0
        print(
            f"{label:<34}{phase.requests:>10}{phase.per_s:>9.0f}{phase.percentile(0.5):>9.1f}"
            f"{phase.percentile(0.99):>9.1f}{phase.errors:>8}{versus:>9.2f}"
        )
    print(f"ratio heartbeat/bare: {ratio:.2f}   (goals: >= 1700 heartbeats/s, p99 < 100 ms, ratio >= 0.5)")
    if args.json:
        print(
            json.dumps(
                {
                    "heartbeats_per_s": round(hb.per_s, 1),
                    "p50_ms": round(hb.percentile(0.5), 2),
                    "p99_ms": round(hb.percentile(0.99), 2),
                    "bare_per_s": round(bare.per_s, 1),
                    "ratio": round(ratio, 3),
                    "core_per_s": round(core.per_s, 1),
                    "core_p99_ms": round(core.percentile(0.99), 2),
                    "core_ratio": round(core_ratio, 3),
                    "bare_p50_ms": round(bare.percentile(0.5), 2),
                    "bare_p99_ms": round(bare.percentile(0.99), 2),
                    "errors": hb.errors + core.errors + bare.errors,
                    "server": args.server,
                    "devices": devices,
                    "concurrency": concurrency,
                    "seconds": seconds,
                    "rounds": rounds,
                    "load_average": [round(load_before, 2), round(load_after, 2)],
                }
            )
        )


if __name__ == "__main__":
    main()
