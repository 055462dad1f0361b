"""A simulated fleet against the real server: heartbeat throughput and version propagation.

    python -m benchmarks.fleet [--devices 1000] [--quick] [--json] [--interval S] [--threads T]

What it does, in one run on this machine:

1. starts the server stack (uvicorn with two workers and the production settings,
   SQLite or ``DATABASE_URL``, embedded Redis; see ``config/stack.py``);
2. runs ``--devices`` full agents (:class:`devices_agent.simulate.Fleet`) in this
   process: each enrolls with one shared token, heartbeats at ``--interval`` seconds
   (staggered over the first interval, +-10 % jitter), classifies two of its own digits
   per cycle and flushes its metrics; 20 % are "slow boards" (+15 ms per inference);
3. **steady state**: heartbeats per second over a window of two intervals, next to the
   rate the schedule asks for (devices / interval), the same-run baseline;
4. **burst**: every device is made due at once (what a websocket nudge to the whole
   fleet would cause); the time until every device completed one more heartbeat gives
   the fleet's peak heartbeat rate through the agent, HTTP and the server;
5. **version propagation**: a new digits version is registered and assigned to every
   device with one bulk update (as a rollout's final wave would); the clock runs until
   every device reported ``active`` (download, SHA-256 and Ed25519 checks, atomic
   install, health check). The server has no websocket nudge yet, so devices learn of
   the version at their next heartbeat: the interval is the floor, and the result is
   shown next to it. The clock stops when every device *ended* its deployment; the
   devices not on the new version at the end (failed or rolled back) are counted. The
   devices get a policy with a 1 s health-check latency budget for this phase: on two
   shared cores a simulated board's wall-clock latency measures the machine's load.

The agents share the two cores with the server, so absolute figures are lower than a
real fleet of separate boards would see; the ratios are what compares across machines.
With ``--json`` the last line is one JSON object with ``devices``, ``heartbeats_per_s``,
``version_to_all_s`` and the rest of the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from devices_agent.agent import Agent
    from devices_agent.simulate import SimDevice


def _wait(predicate: Any, *, timeout: float, poll: float = 0.5) -> float:
    """Seconds until ``predicate()`` held (raises TimeoutError after ``timeout``)."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"not reached within {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic() - started


def _progress(message: str) -> None:
    print(f"[fleet] {message}", file=sys.stderr, flush=True)


def _agent(device: SimDevice) -> Agent:
    """The agent of an in-process simulated board (a board run as a process has none here)."""
    assert device.agent is not None, "the fleet runs its agents in this process"
    return device.agent


def run(*, devices: int, interval: float, threads: int, quick: bool) -> dict[str, Any]:
    from config.stack import Stack
    from devices_agent.simulate import Fleet

    # A thousand agents hold a thousand SQLite outboxes (three descriptors each).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 16384)), hard))
    logging.getLogger("devices_agent").setLevel(logging.ERROR)
    with Stack.scratch("flotilla-fleet-bench-", production=True, heartbeat_interval_s=60) as stack:
        stack.migrate()
        stack.setup_django()
        stack.start_web(workers=2, timeout=90)
        from django.db import connection

        from config.demo.seed import digits_version, enrollment_token, promote_to_production
        from fleet.models import Deployment, Device, UpdatePolicy

        token = enrollment_token(max_uses=devices)
        state_root = Path(tempfile.mkdtemp(prefix="flotilla-fleet-bench-"))
        fleet = Fleet(
            server_url=stack.url,
            token=token,
            devices=devices,
            state_root=state_root,
            seed=0,
            heartbeat_interval_s=interval,
            stagger_s=interval,
            inferences_per_cycle=2,
            threads=threads,
            train=False,
        )
        fleet.start()
        try:
            enroll_s = _wait(
                lambda: all(d.steps > 0 or d.dead for d in fleet.devices), timeout=60 + devices * 0.5
            )
            dead = sum(1 for d in fleet.devices if d.dead)
            _progress(f"{devices} devices enrolled in {enroll_s:.1f} s; measuring the steady state")

            # Steady state over two intervals.
            window = 2 * interval
            beats0, fails0 = fleet.stats.heartbeats, fleet.stats.heartbeat_failures
            time.sleep(window)
            steady = (fleet.stats.heartbeats - beats0) / window
            steady_failures = fleet.stats.heartbeat_failures - fails0

            # Burst: everyone due now.
            steps0 = [d.steps for d in fleet.devices]
            beats0 = fleet.stats.heartbeats
            fleet.nudge_all()
            burst_s = _wait(
                lambda: all(d.steps > s or d.dead for d, s in zip(fleet.devices, steps0, strict=True)),
                timeout=120 + devices * 0.2,
                poll=0.1,
            )
            burst = (fleet.stats.heartbeats - beats0) / burst_s

            # Version propagation. The health check's latency budget is generous here:
            # a thousand simulated boards share two cores (and one GIL) with the server,
            # so wall-clock inference latency measures the machine, not the model.
            _progress(f"steady {steady:.1f}/s, burst {burst:.1f}/s; assigning a new version")
            version, _ = digits_version(seed=1)
            # Released as a rollout's version must be before its final wave reaches everyone.
            version = promote_to_production(version=version)
            policy = UpdatePolicy.objects.create(name="bench-fleet", health_latency_budget_ms=1000.0)
            live = Device.objects.exclude(status=Device.Status.DECOMMISSIONED)
            live.update(policy=policy)
            total = live.count()
            started = time.monotonic()
            live.update(desired_version=version)
            marks: dict[str, float] = {}
            ended = ("active", "failed", "rolled_back")

            def progress() -> bool:
                rows = Deployment.objects.filter(version=version, state__in=ended)
                done = rows.values("device").distinct().count()
                active = rows.filter(state="active").count()
                connection.close()  # a fresh snapshot each poll (SQLite WAL readers)
                elapsed = time.monotonic() - started
                for name, share in (("first", 1 / max(total, 1)), ("p50", 0.5), ("p95", 0.95)):
                    if name not in marks and active >= share * total:
                        marks[name] = elapsed
                return done >= total

            version_s = _wait(progress, timeout=300 + devices * 0.5, poll=0.25)
            failed = sum(1 for d in fleet.devices if _agent(d).state.current_version_id() != version.pk)
            _progress(f"version everywhere after {version_s:.1f} s ({failed} not active)")
        finally:
            fleet.stop()
        artifact_size = version.artifacts.get(kind="onnx").size
        seqs = [_agent(d).state.load().get("seq", 0) for d in fleet.devices]
        result = {
            "devices": devices,
            "interval_s": interval,
            "threads": threads,
            "enroll_all_s": round(enroll_s, 2),
            "dead_devices": dead,
            "expected_heartbeats_per_s": round(devices / interval, 1),
            "heartbeats_per_s": round(steady, 1),
            "steady_failures": steady_failures,
            "burst_heartbeats_per_s": round(burst, 1),
            "burst_s": round(burst_s, 2),
            "version_to_all_s": round(version_s, 2),
            "version_first_s": round(marks.get("first", version_s), 2),
            "version_p50_s": round(marks.get("p50", version_s), 2),
            "version_p95_s": round(marks.get("p95", version_s), 2),
            "version_not_active": failed,
            "artifact_bytes": artifact_size,
            "heartbeats_total": fleet.stats.heartbeats,
            "heartbeat_failures_total": fleet.stats.heartbeat_failures,
            "predictions_total": fleet.stats.predictions,
            "median_heartbeats_per_device": statistics.median(seqs) if seqs else 0,
            "database": stack.database,
            "cpus": os.cpu_count(),
            "quick": quick,
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 devices at a 5 s interval")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--devices", type=int, default=None)
    parser.add_argument("--interval", type=float, default=None, help="heartbeat interval of the fleet (s)")
    parser.add_argument("--threads", type=int, default=16, help="worker threads driving the agents")
    args = parser.parse_args(argv)
    devices = args.devices or (100 if args.quick else 1000)
    interval = args.interval or (5.0 if args.quick else 10.0)
    r = run(devices=devices, interval=interval, threads=args.threads, quick=args.quick)
    print(
        f"fleet benchmark: {devices} simulated agents on {args.threads} threads, heartbeat interval "
        f"{interval:g} s (short on purpose: the server has no websocket nudge yet), server=uvicorn x2, "
        f"database={r['database']}, {r['cpus']} CPUs shared by agents and server"
    )
    print(f"all devices enrolled and heartbeating after {r['enroll_all_s']} s ({r['dead_devices']} dead)")
    print()
    header = f"{'heartbeats':<46}{'per s':>10}{'ratio':>8}"
    print(header)
    print("-" * len(header))
    expected = r["expected_heartbeats_per_s"]
    print(f"{'schedule asks for (devices / interval), baseline':<46}{expected:>10.1f}{1.0:>8.2f}")
    print(
        f"{'steady state, measured over two intervals':<46}{r['heartbeats_per_s']:>10.1f}"
        f"{r['heartbeats_per_s'] / expected:>8.2f}"
    )
    print(
        f"{'burst (whole fleet due at once)':<46}{r['burst_heartbeats_per_s']:>10.1f}"
        f"{r['burst_heartbeats_per_s'] / expected:>8.2f}"
    )
    print(
        f"burst: every device heartbeated again within {r['burst_s']} s; "
        f"failed heartbeats in the steady window: {r['steady_failures']}"
    )
    print()
    title = f"new version reaches the fleet ({r['artifact_bytes']:,} B ONNX)"
    header = f"{title:<46}{'s':>10}{'/ interval':>12}"
    print(header)
    print("-" * len(header))
    for label, key in (
        ("heartbeat interval (floor without a nudge)", "interval_s"),
        ("first device active", "version_first_s"),
        ("50 % of devices active", "version_p50_s"),
        ("95 % of devices active", "version_p95_s"),
        ("every device active", "version_to_all_s"),
    ):
        print(f"{label:<46}{r[key]:>10.2f}{r[key] / interval:>12.2f}")
    print(
        f"devices not on the new version at the end: {r['version_not_active']}; "
        f"heartbeats {r['heartbeats_total']}, failed {r['heartbeat_failures_total']}, "
        f"predictions {r['predictions_total']}"
    )
    if args.json:
        print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
