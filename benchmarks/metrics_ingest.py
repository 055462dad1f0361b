"""Metric samples stored per second by the ingest service, next to a bare bulk insert.

    python -m benchmarks.metrics_ingest [--quick] [--json] [--devices D] [--batches B]
                                        [--samples S] [--rounds R]

What it does, all in one run on this machine:

1. a fresh stack's database (SQLite, or ``DATABASE_URL``) and cache (an embedded
   Redis-protocol server, or ``REDIS_URL``) with the production settings, migrated, and
   ``--devices`` devices;
2. ``--batches`` batches of ``--samples`` samples each (the agent's batch), spread over the
   devices, stored through ``fleet.services.metrics.metrics_ingest``: the idempotency row,
   the hourly cap in the cache, the version check and one multi-row INSERT per batch;
3. the baseline: the same samples written with one ``bulk_create`` per batch and nothing
   else, into the same table;
4. the rollup of everything written (``fleet.services.retention.metrics_rollup``): samples
   summed per second.

The two writers alternate over ``--rounds`` rounds; rates are medians. With ``--json`` the
last line is one JSON object with ``ingest_per_s``, ``bare_per_s``, ``ratio`` and
``rollup_per_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from datetime import timedelta
from typing import Any


def _batches(devices: list[Any], batches: int, samples: int) -> list[tuple[Any, list[Any]]]:
    from django.utils import timezone

    from fleet.services.metrics import Sample

    now = timezone.now()
    names = ("latency_ms", "confidence", "correct", "cpu_percent")
    out = []
    for b in range(batches):
        device = devices[b % len(devices)]
        out.append(
            (
                device,
                [
                    Sample(
                        name=names[i % len(names)],
                        value=float(i % 2),
                        ts=now - timedelta(seconds=i),
                        version_id=None,
                    )
                    for i in range(samples)
                ],
            )
        )
    return out


def _ingest(batches: list[tuple[Any, list[Any]]]) -> float:
    from fleet.services.metrics import metrics_ingest

    started = time.perf_counter()
    for device, samples in batches:
        metrics_ingest(device=device, batch_id=uuid.uuid4().hex, samples=samples)
    return time.perf_counter() - started


def _bare(batches: list[tuple[Any, list[Any]]]) -> float:
    from fleet.models import MetricSample

    started = time.perf_counter()
    for device, samples in batches:
        MetricSample.objects.bulk_create(
            [
                MetricSample(device=device, version_id=None, name=s.name, value=s.value, ts=s.ts)
                for s in samples
            ],
            batch_size=500,
        )
    return time.perf_counter() - started


def run(*, devices: int, batches: int, samples: int, rounds: int) -> dict[str, Any]:
    from config.stack import Stack

    stack = Stack.scratch("flotilla-bench-", production=True)
    try:
        stack.migrate()
        stack.setup_django()
        from fleet.models import Device
        from fleet.services.retention import metrics_rollup

        rows = Device.objects.bulk_create([Device(name=f"ingest-{i:05d}") for i in range(devices)])
        work = _batches(list(rows), batches, samples)
        total = batches * samples
        ingest, bare = [], []
        for _ in range(rounds):
            ingest.append(total / _ingest(work))
            bare.append(total / _bare(work))
        started = time.perf_counter()
        summed = metrics_rollup()["samples"]
        rollup_s = time.perf_counter() - started
    finally:
        stack.close()
    ingest_per_s, bare_per_s = statistics.median(ingest), statistics.median(bare)
    return {
        "devices": devices,
        "batches": batches,
        "samples_per_batch": samples,
        "rounds": rounds,
        "ingest_per_s": round(ingest_per_s),
        "bare_per_s": round(bare_per_s),
        "ratio": round(ingest_per_s / bare_per_s, 3),
        "rollup_samples": summed,
        "rollup_per_s": round(summed / rollup_s),
        "database": stack.database,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 devices, 200 batches, 1 round")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--devices", type=int, default=None, help="devices (1000)")
    parser.add_argument("--batches", type=int, default=None, help="batches per round and writer (2000)")
    parser.add_argument("--samples", type=int, default=100, help="samples per batch (100)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (3)")
    args = parser.parse_args(argv)
    devices = args.devices or (100 if args.quick else 1000)
    batches = args.batches or (200 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 3)
    r = run(devices=devices, batches=batches, samples=args.samples, rounds=rounds)
    print(
        f"\nMetrics ingest: {batches} batches x {args.samples} samples over {devices} devices "
        f"({r['database']}, load {os.getloadavg()[0]:.1f}), medians of {rounds} rounds\n"
    )
    print("| writer | samples/s | ratio |")
    print("|---|---|---|")
    print(
        f"| ingest service (idempotency, cap, one INSERT per batch) | {r['ingest_per_s']:,} | {r['ratio']} |"
    )
    print(f"| bare bulk insert (baseline) | {r['bare_per_s']:,} | 1.0 |")
    print(f"| rollup into hours and days | {r['rollup_per_s']:,} | of {r['rollup_samples']:,} samples |")
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
