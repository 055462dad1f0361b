"""One large round aggregated by 1 and then 2 Celery workers, in shards of partial sums.

    python -m benchmarks.aggregation_scaleout [--quick] [--json] [--workers 1,2]

Setup: a fresh SQLite database and embedded Redis-protocol server (``config.stack``),
production settings; an MLP family whose hidden widths give the model its size (full:
widths 980 x 980, 1,034,890 parameters, 4.1 MB of float32; ``--quick``: 300 x 300,
112,810 parameters); ``devices`` boards (full: 1,000; quick: 200) in one group. For each
worker count a FedAvg job is started and every board's delta (float32, seeded per board,
the same in every case, weighted by a per-board example count) is recorded through
``training.services.update_receive``, as the device API does; the last one closes the
round, and ``training.round_aggregate`` runs on the workers (real ``celery worker``
processes, concurrency 1 each; ``ORT_TRAINING_AUTO`` off, so they do nothing else).
The round is cut into shards of ``shard_size`` updates (``AGGREGATION_SHARD_SIZE``;
full: 100, quick: 25) that the workers sum in parallel (one Celery group), and the
round's worker merges them.

* ``wall_s``: from the round's ``closed_at`` (set by the worker that closed it, right
  before it sent ``training.round_aggregate``) until the round left ``aggregating`` as
  seen by this process polling every 20 ms: the whole aggregation phase, shards,
  checkpoints, the reduce and writing the result.
* ``aggregate_s``: the round's own measurement of the same phase inside the worker.
* ``speedup``: ``wall_s`` of one worker / ``wall_s`` of this case.
* ``max_abs_diff``: largest difference between the stored result and a single-pass
  in-memory FedAvg of the same deltas in this process (float64 sums).
* ``shards``, ``shards_by_worker``: how many shards, and how many each worker summed.

The machine's cores are shared with whatever else runs on it: with 2 workers on 2 cores
the speed-up is bounded by 2 and by memory bandwidth (every update is read once).

With ``--json`` the last line is one JSON object with ``cases`` (``workers``,
``wall_s``, ``max_abs_diff``, ...) and the run's parameters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Size:
    devices: int
    widths: tuple[int, int]
    shard_size: int


FULL = Size(devices=1000, widths=(980, 980), shard_size=100)
QUICK = Size(devices=200, widths=(300, 300), shard_size=25)


def _delta(shapes: dict[str, tuple[int, ...]], index: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1000 + index)
    return {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.001) for k, s in shapes.items()}


def _examples(index: int) -> int:
    return 10 + (index * 37) % 490


def _seed(devices: int, widths: tuple[int, int]) -> tuple[Any, Any, Any, list[Any]]:
    """A family with one version of the given widths, ``devices`` online boards in a group."""
    from config.demo.nets import build_model, bundle, spec_fields, state_to_numpy
    from fleet.auth import hash_secret, new_secret
    from fleet.models import Device, DeviceGroup
    from models_registry.services import family_create, version_create

    family = family_create(name="scaleout", arch="mlp", **spec_fields("mlp"))
    made = bundle("mlp", state_to_numpy(build_model("mlp", widths=widths)))
    version = version_create(
        family=family, weights=made.weights, onnx=made.onnx, program=made.program, head=made.head, arch="mlp"
    )
    group = DeviceGroup.objects.create(name="scaleout-fleet")
    secret_hash = hash_secret(new_secret())
    boards = Device.objects.bulk_create(
        Device(
            name=f"scaleout-{i:05d}",
            secret_hash=f"{secret_hash}{i}",
            status=Device.Status.ONLINE,
            state={"local_examples": _examples(i), "training_backends": ["torch"]},
        )
        for i in range(devices)
    )
    for board in boards:
        board.groups.add(group)
    return family, version, group, boards


def _wait(predicate: Any, *, timeout: float, what: str, stack: Any) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            logs = "\n".join(stack.log(name)[-2000:] for name in ("w0", "w1"))
            raise TimeoutError(f"timed out waiting for {what}\n{logs}")
        time.sleep(0.02)


def run_case(
    *, stack: Any, workers: int, family: Any, version: Any, group: Any, boards: list[Any], shard_size: int
) -> dict[str, Any]:
    """One round on ``workers`` fresh workers; returns its measurements and the stored result."""
    from devices_agent.codecs import decode_tensors, encode_delta
    from training import selectors, services, storage
    from training.models import AggregationShard, FederatedRound

    names = [f"w{i}" for i in range(workers)]
    env = {
        "AGGREGATION_SHARD_MIN_UPDATES": str(2 * shard_size),
        "AGGREGATION_SHARD_SIZE": str(shard_size),
        "ROUND_CHECKPOINT_EVERY": str(shard_size),
        "AGGREGATION_SHARD_POLL_S": "0.02",
    }
    for name in names:
        stack.start_worker(name, concurrency=1, extra_env=env)
    try:
        job = services.job_create(
            actor=None,
            family=family,
            base_version=version,
            target_group=group,
            name=f"scaleout-{workers}",
            rounds=1,
            min_clients=len(boards),
            quorum=len(boards),
            strategy="fedavg",
            codec="none",
            round_deadline_s=3600,
        )
        services.job_start(job_id=job.pk, actor=None)
        _wait(
            lambda: FederatedRound.objects.filter(job=job, status="collecting").exists(),
            timeout=120,
            what="the round to open",
            stack=stack,
        )
        rnd = FederatedRound.objects.get(job=job)
        shapes = {k: tuple(v.shape) for k, v in selectors.round_weights(rnd=rnd).items()}
        by_id = {str(b.pk): (i, b) for i, b in enumerate(boards)}
        for device_id in rnd.selected:
            index, board = by_id[device_id]
            services.update_receive(
                round_id=rnd.pk,
                device=board,
                body=encode_delta(_delta(shapes, index), codec="none").data,
                num_examples=str(_examples(index)),
                metrics=None,
            )
        _wait(
            lambda: FederatedRound.objects.filter(pk=rnd.pk)
            .exclude(status__in=("collecting", "aggregating"))
            .exists(),
            timeout=1800,
            what="the aggregation",
            stack=stack,
        )
        seen_end = time.time()
        rnd.refresh_from_db()
        if rnd.status == "failed":
            raise RuntimeError(f"round failed: {rnd.failure_reason}")
        assert rnd.closed_at is not None
        wall = seen_end - rnd.closed_at.timestamp()
        data = storage.read_bytes(
            name=f"{storage.round_dir(job_id=rnd.job_id, round_number=rnd.number)}/result.safetensors"
        )
        tensors, _ = decode_tensors(data)
        result = {k: np.asarray(tensors[k], np.float32) for k in shapes}
        shards = list(AggregationShard.objects.filter(round=rnd))
        by_worker = Counter(s.worker for s in shards)
    finally:
        for name in names:
            stack.stop(name)
    return {
        "workers": workers,
        "wall_s": round(wall, 3),
        "aggregate_s": round(float(rnd.durations.get("aggregate_s", 0.0)), 3),
        "shards": len(shards),
        "shards_by_worker": sorted(by_worker.values(), reverse=True),
        "result": result,
        "round": rnd,
    }


def reference(rnd: Any, boards: list[Any]) -> dict[str, np.ndarray]:
    """Single-pass in-memory FedAvg of the same deltas (float64 sums)."""
    from training import selectors

    g = selectors.round_weights(rnd=rnd)
    shapes = {k: tuple(v.shape) for k, v in g.items()}
    acc = {k: np.zeros(s, np.float64) for k, s in shapes.items()}
    total = 0.0
    for index in range(len(boards)):
        w = float(_examples(index))
        for k, d in _delta(shapes, index).items():
            acc[k] += w * d
        total += w
    return {k: (g[k] + acc[k] / total).astype(np.float32) for k in g}


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 updates x 113k parameters")
    parser.add_argument("--json", action="store_true", help="print a JSON object last")
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    counts = [int(c) for c in args.workers.split(",")]

    from config.stack import Stack

    work = Path(tempfile.mkdtemp(prefix="flotilla-scaleout-"))
    stack = Stack(
        data_dir=work,
        settings="config.settings.production",
        production_secrets=True,
        log_level="WARNING",
        database_url=f"sqlite:///{work / 'bench.sqlite3'}",
        # The workers do only the rounds: no ONNX Runtime training artifacts for the version.
        extra_env={"ORT_TRAINING_AUTO": "false"},
    )
    rows: list[dict[str, Any]] = []
    try:
        stack.migrate()
        stack.setup_django()
        family, version, group, boards = _seed(size.devices, size.widths)
        params = sum(int(v.size) for v in _version_weights(version).values())
        print(
            f"Aggregation scale-out: {len(boards)} updates x {params:,} parameters, FedAvg in shards of "
            f"{size.shard_size}, real Celery workers (concurrency 1 each)"
        )
        columns = [
            "workers",
            "wall_s",
            "aggregate_s",
            "speedup",
            "shards",
            "shards_by_worker",
            "max_abs_diff",
        ]
        print(" ".join(f"{c:>16}" for c in columns), flush=True)
        expected: dict[str, np.ndarray] | None = None
        for workers in counts:
            row = run_case(
                stack=stack,
                workers=workers,
                family=family,
                version=version,
                group=group,
                boards=boards,
                shard_size=size.shard_size,
            )
            if expected is None:
                expected = reference(row["round"], boards)
            result = row.pop("result")
            row.pop("round")
            diff = max(float(np.abs(result[k].astype(np.float64) - expected[k]).max()) for k in expected)
            row["max_abs_diff"] = float(f"{diff:.3g}")
            row["speedup"] = round(rows[0]["wall_s"] / row["wall_s"], 2) if rows else 1.0
            rows.append(row)
            print(" ".join(f"{str(row[c]):>16}" for c in columns), flush=True)
    finally:
        stack.close()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(
            json.dumps(
                {
                    "devices": size.devices,
                    "params": params,
                    "shard_size": size.shard_size,
                    "cases": rows,
                }
            )
        )


def _version_weights(version: Any) -> dict[str, np.ndarray]:
    from devices_agent.codecs import decode_tensors

    with version.artifacts.get(kind="weights").file.open("rb") as handle:
        tensors, _ = decode_tensors(handle.read())
    return {k: np.asarray(v) for k, v in tensors.items()}


if __name__ == "__main__":
    main()
