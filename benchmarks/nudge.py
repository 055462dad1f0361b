"""Agent sockets one websocket process holds, and one nudge to all of them.

    python -m benchmarks.nudge [--quick] [--json] [--sockets N] [--rounds R]

What it does, all in one run on this machine:

1. a fresh stack (SQLite or ``DATABASE_URL``; an embedded Redis-protocol server or
   ``REDIS_URL``) with the production settings; ``--sockets`` devices enrolled through the
   enrollment service, each with its secret;
2. one ASGI process as production runs it (uvicorn, uvloop, the Redis pub/sub channel
   layer), measured for RSS before and after the agents connect;
3. ``--sockets`` real websocket clients (``/ws/agent/``, ``Authorization: Device …``) in
   this process, connected 100 at a time;
4. ``--rounds`` times, a ``federated_round.opened`` event naming every device, emitted
   through ``core.events`` as a service would: the time the sender spends, and the time
   until every socket has its nudge (p50 and the last);
5. the baseline, in the same run: what the sender spent when it published one message
   per device (``group_send`` to a per-device group, in a loop), the way nudges were sent
   before they fanned out per process.

With ``--json`` the last line is one JSON object with ``sockets``, ``rss_per_socket_kb``,
``send_ms``, ``per_device_send_ms``, ``delivered_all_ms`` and ``delivered_p50_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import threading
import time
from typing import Any

import psutil


def _rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        total += child.memory_info().rss
    return total / 1e6


class Clients:
    """The agents' sockets, each waiting for its nudges and noting when they arrive."""

    def __init__(self, url: str, secrets: list[str]) -> None:
        self.url = url
        self.secrets = secrets
        self.sockets: list[Any] = []
        self.arrivals: list[list[float]] = [[] for _ in secrets]
        self.readers: list[asyncio.Task[None]] = []

    async def connect(self, *, parallel: int = 100) -> float:
        from websockets.asyncio.client import connect

        started = time.perf_counter()
        for i in range(0, len(self.secrets), parallel):
            part = self.secrets[i : i + parallel]
            self.sockets += await asyncio.gather(
                *(
                    connect(
                        self.url,
                        additional_headers={"Authorization": f"Device {s}"},
                        open_timeout=60,
                        ping_interval=None,
                    )
                    for s in part
                )
            )
        elapsed = time.perf_counter() - started
        self.readers = [asyncio.ensure_future(self._read(n, s)) for n, s in enumerate(self.sockets)]
        return elapsed

    async def _read(self, n: int, socket: Any) -> None:
        async for _ in socket:
            self.arrivals[n].append(time.perf_counter())

    async def wait_all(self, count: int, *, timeout: float) -> bool:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if all(len(a) >= count for a in self.arrivals):
                return True
            await asyncio.sleep(0.01)
        return False

    async def close(self) -> None:
        for task in self.readers:
            task.cancel()
        await asyncio.gather(*(s.close() for s in self.sockets), return_exceptions=True)


def _in_thread(fn: Any) -> float:
    """Run `fn` in a thread of its own (it uses async_to_sync) and time it."""
    out: dict[str, float] = {}

    def go() -> None:
        t0 = time.perf_counter()
        fn()
        out["s"] = time.perf_counter() - t0

    thread = threading.Thread(target=go)
    thread.start()
    thread.join()
    return out["s"]


async def _measure(clients: Clients, device_ids: list[str], rounds: int) -> dict[str, list[float]]:
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from core.events import emit

    layer = get_channel_layer()
    loop = asyncio.get_running_loop()
    result: dict[str, list[float]] = {"send": [], "per_device": [], "all": [], "p50": []}
    for r in range(rounds):
        payload = {"job": 1, "round": r + 1, "round_id": r + 1, "devices": device_ids}
        started = time.perf_counter()
        send_s = await loop.run_in_executor(
            None, _in_thread, lambda p=payload: emit("federated_round.opened", p)
        )
        if not await clients.wait_all(r + 1, timeout=120):
            missing = sum(1 for a in clients.arrivals if len(a) <= r)
            raise SystemExit(f"{missing} sockets never received round {r + 1}'s nudge")
        latest = [a[r] - started for a in clients.arrivals]
        result["send"].append(send_s)
        result["all"].append(max(latest))
        result["p50"].append(statistics.median(latest))

        def per_device() -> None:
            message = {"type": "nudge", "reason": "training_round"}
            for device_id in device_ids:
                async_to_sync(layer.group_send)(f"device.{device_id}", message)

        result["per_device"].append(await loop.run_in_executor(None, _in_thread, per_device))
    return result


def run(*, sockets: int, rounds: int) -> dict[str, Any]:
    from benchmarks.heartbeat import _enroll
    from config.stack import Stack

    stack = Stack.scratch("flotilla-bench-", production=True)
    try:
        stack.migrate()
        stack.setup_django()
        from fleet.models import Device

        secrets = _enroll(sockets)
        device_ids = [str(pk) for pk in Device.objects.order_by("name").values_list("pk", flat=True)]
        web = stack.start_web(server="uvicorn", workers=1)
        assert web.process is not None
        rss_before = _rss_mb(web.process.pid)
        clients = Clients(stack.url.replace("http://", "ws://") + "/ws/agent/", secrets)

        async def main() -> tuple[float, float, dict[str, list[float]]]:
            connect_s = await clients.connect()
            await asyncio.sleep(1.0)  # let the server settle before reading its memory
            rss_after = _rss_mb(web.process.pid)  # type: ignore[union-attr]
            try:
                measured = await _measure(clients, device_ids, rounds)
            finally:
                await clients.close()
            return connect_s, rss_after, measured

        connect_s, rss_after, measured = asyncio.run(main())
    finally:
        stack.close()
    return {
        "sockets": sockets,
        "rounds": rounds,
        "connect_per_s": round(sockets / connect_s, 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_per_socket_kb": round((rss_after - rss_before) * 1000 / sockets, 1),
        "send_ms": round(statistics.median(measured["send"]) * 1000, 1),
        "per_device_send_ms": round(statistics.median(measured["per_device"]) * 1000, 1),
        "delivered_all_ms": round(statistics.median(measured["all"]) * 1000, 1),
        "delivered_p50_ms": round(statistics.median(measured["p50"]) * 1000, 1),
        "database": stack.database,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 sockets, 2 rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--sockets", type=int, default=None, help="agent sockets (5000)")
    parser.add_argument("--rounds", type=int, default=None, help="nudges to all sockets (5)")
    args = parser.parse_args(argv)
    sockets = args.sockets or (300 if args.quick else 5000)
    rounds = args.rounds or (2 if args.quick else 5)
    result = run(sockets=sockets, rounds=rounds)
    ratio = result["per_device_send_ms"] / result["send_ms"] if result["send_ms"] else 0.0
    print(
        f"\nNudges: {sockets} agent sockets on one uvicorn process ({result['database']}, "
        f"load {os.getloadavg()[0]:.1f}), medians of {rounds} nudges to all\n"
    )
    rows = [
        ("agent sockets held", f"{sockets}", ""),
        ("connects per second", f"{result['connect_per_s']}", ""),
        ("ws process RSS (MB)", f"{result['rss_after_mb']}", f"{result['rss_before_mb']} with none"),
        ("RSS per socket (KB)", f"{result['rss_per_socket_kb']}", ""),
        ("sender: one message per batch (ms)", f"{result['send_ms']}", ""),
        (
            "sender: one message per device (ms)",
            f"{result['per_device_send_ms']}",
            f"baseline; {ratio:.0f}x the batched send",
        ),
        ("every socket nudged (ms)", f"{result['delivered_all_ms']}", f"p50 {result['delivered_p50_ms']}"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | value | note |")
    print(f"|{'-' * (width + 2)}|-------|------|")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value} | {note} |")
    if args.json:
        print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
