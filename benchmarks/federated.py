"""Federated learning through the whole system versus a plain PyTorch FedAvg loop.

    python -m benchmarks.federated [--quick] [--json] [--rounds N] [--devices N]

Setup (one run, this machine): scikit-learn's digits split 80/20 stratified (seed 0),
the training part spread over ``--devices`` devices (default 20) with a Dirichlet(0.5)
label split (seed 0); MLP 64-64-10 (``mlp`` of ``config.demo.nets``, seed 0 initial
weights), registered as a bundle (program, weights, ONNX) in a family with the digits
data sets, so every round's version is evaluated centrally on the 20% test split;
5 local epochs, batch 32, SGD lr 0.05, ``--rounds`` rounds (default 30; 5 with
``--quick``), every device in every round, FedAvg weighted by local examples, codec
``none``.

1. **system**: a fresh SQLite database and embedded Redis-protocol server, the ASGI web
   server (uvicorn, 2 processes, production settings) and one Celery worker as real
   processes; the job is created and started through ``training.services``; each
   device is a process of its own (as boards are) running ``devices_agent.federated``'s
   ``FederatedTrainer`` over its share (``FixedData``), with the server's pinned signing
   key (long poll of ``GET rounds/?wait=5``, woken over Redis pub/sub when a round
   opens and carrying the task body; signed program and weights download, training
   with the torch backend, upload over real HTTP). Rounds close as soon as every
   device answered; the worker aggregates, registers a version per round (its ONNX
   graph is the base graph with the new weights written in) and evaluates it on the
   test split. An untimed one-round job warms the processes up first; wall time is
   from ``job_start`` to the job's ``succeeded``.
2. **reference**: the same rounds as a plain loop in one thread on the program and
   weights the server stored: the same backend code (``TorchBackend.train``, one
   thread) with the same seeds (``local_seed`` of the round task's seed and the device
   index), a float64 weighted average, ``TorchBackend.evaluate`` on the test split.
   Overhead per round = (system wall - reference wall) / rounds. The phase table says
   where a round's time goes, as medians over the rounds: on the boards (each
   ``FederatedTrainer`` outcome carries its timings) the wait from the round's opening to
   the task reaching the board, the download of the program and weights, training (local
   evaluation, training and encoding) and the upload, for the median and the slowest
   board; on the server the close after the last upload, the hop to the aggregating
   worker, aggregation, registration and evaluation, and the open of the next round.
3. **codecs**: the reference loop again with each codec applied to the deltas
   (encode on the device side, ``decode_delta`` on the server side, top-k with
   per-device error feedback), run through the plain loop, not the full stack, to keep
   the benchmark short. Bytes per round = sum of the encoded deltas (safetensors
   headers included: on this 9 k-parameter model the header and int8 scales are ~5%
   of an int8 payload, and top-k sends an int32 index with every float32 value, so
   keeping 10% of the entries costs 0.8 bytes per parameter: at most 5x fewer bytes).

With ``--json`` the last line is one JSON object with ``final_accuracy``,
``reference_accuracy``, ``accuracy_per_round``, ``wall_s``, ``reference_wall_s``,
``overhead_per_round_s``, ``bytes_per_round``, ``codecs``, ``phases`` (each with
``median`` and ``slowest``) and the run's parameters.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ARCH = "mlp"
EPOCHS = 5
BATCH = 32
LR = 0.05
ALPHA = 0.5


def _seconds(start: Any, end: Any) -> float:
    """Seconds between two timestamps of a finished round (both are set once it is done)."""
    if start is None or end is None:
        return 0.0
    return float((end - start).total_seconds())


def _data(devices: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    from devices_agent.data import client_dataset, load_digits_split

    _, _, x_test, y_test = load_digits_split(seed=0, test_size=0.2)
    parts = [client_dataset(client_index=i, n_clients=devices, alpha=ALPHA, seed=0) for i in range(devices)]
    return parts, x_test, y_test


def _seed_rows(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Any, Any, Any, list[str], Any]:
    """Family (with the digits data sets), first version, a group of online devices."""
    from config.demo.nets import bundle, initial_weights, spec_fields
    from config.demo.seed import digits_datasets
    from fleet.auth import hash_secret, new_secret
    from fleet.models import Device, DeviceGroup
    from models_registry.services import family_create, version_create
    from training import services

    family = family_create(name="bench-digits", arch=ARCH, **spec_fields(ARCH))
    digits_datasets(family=family, seed=0)
    made = bundle(ARCH, initial_weights(ARCH, seed=0))
    version = version_create(
        family=family, weights=made.weights, onnx=made.onnx, program=made.program, head=made.head, arch=ARCH
    )
    group = DeviceGroup.objects.create(name="bench-fleet")
    secrets = []
    for i, (x, _) in enumerate(parts):
        secret = new_secret()
        device = Device.objects.create(
            name=f"bench-{i:03d}",
            secret_hash=hash_secret(secret),
            status=Device.Status.ONLINE,
            # What a board's heartbeat would say: rounds select boards holding examples.
            state={"local_examples": len(x), "training_backends": ["torch"]},
        )
        device.groups.add(group)
        secrets.append(secret)
    return family, version, group, secrets, services


def _stored_model(version: Any) -> tuple[bytes, dict[str, np.ndarray]]:
    """The program and the weights of ``version`` as the server stored them."""
    from devices_agent.codecs import decode_tensors
    from models_registry.selectors import version_program

    program = version_program(version=version)
    assert program is not None
    with version.artifacts.get(kind="weights").file.open("rb") as handle:
        tensors, _ = decode_tensors(handle.read())
    return program, {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _board(
    *,
    url: str,
    secret: str,
    state_dir: str,
    x: np.ndarray,
    y: np.ndarray,
    public_key: bytes,
    device_seed: int,
    stop: Any,
    results: Any,
) -> None:
    """One board (a process of its own): long-polls for rounds and trains on its share.

    Every outcome goes to ``results`` with the board's HTTP byte and request counts so far.
    """
    import torch

    from devices_agent.client import AgentClient, WireCounter
    from devices_agent.federated import FederatedTrainer, FixedData, run_rounds

    torch.set_num_threads(1)
    counter = WireCounter()

    def counted() -> tuple[int, int]:
        return counter.sent + counter.received, counter.requests

    trainer = FederatedTrainer(
        client=AgentClient(server_url=url, secret=secret, counter=counter),
        state_dir=state_dir,
        data=FixedData(x, y),
        public_key=public_key,
        device_seed=device_seed,
        should_stop=stop.is_set,
    )
    run_rounds(
        trainer,
        stop=stop,
        wait_s=5.0,
        on_outcome=lambda outcome: results.put(("outcome", device_seed, outcome, counted())),
    )
    results.put(("final", device_seed, None, counted()))


def _run_job(services: Any, job_id: int, *, timeout: float, stack: Any, poll: Any = None) -> str:
    """Start a job and wait for it to end; returns its final status."""
    from training.models import FederatedJob

    services.job_start(job_id=job_id, actor=None)
    deadline = time.perf_counter() + timeout
    while True:
        status = FederatedJob.objects.filter(pk=job_id).values_list("status", flat=True).first()
        if status in ("succeeded", "failed", "cancelled"):
            return str(status)
        if time.perf_counter() > deadline:
            raise TimeoutError(stack.log("worker")[-3000:])
        if poll is not None:
            poll()
        time.sleep(0.02)


def run_system(*, devices: int, rounds: int) -> dict[str, Any]:
    """The full stack: web + worker processes, devices as processes over HTTP."""
    from config.stack import Stack

    work = Path(tempfile.mkdtemp(prefix="flotilla-fedbench-"))
    # Always a fresh SQLite file, whatever DATABASE_URL says.
    stack = Stack(
        data_dir=work,
        settings="config.settings.production",
        production_secrets=True,
        log_level="WARNING",
        database_url=f"sqlite:///{work / 'bench.sqlite3'}",
    )
    stack.migrate()
    stack.setup_django()
    import base64

    from models_registry.signing import signing_public_key_b64
    from training.models import FederatedRound

    parts, _, _ = _data(devices)
    family, version, group, secrets, services = _seed_rows(parts)
    program, initial = _stored_model(version)
    public_key = base64.b64decode(signing_public_key_b64())

    def make(name: str, n_rounds: int) -> Any:
        return services.job_create(
            actor=None,
            family=family,
            base_version=version,
            target_group=group,
            name=name,
            rounds=n_rounds,
            min_clients=devices,
            quorum=devices,
            local_epochs=EPOCHS,
            batch_size=BATCH,
            lr=LR,
            strategy="fedavg",
            codec="none",
            round_deadline_s=600,
            seed=0,
        )

    # A one-round job first, untimed: processes import torch and warm their caches
    # on first use, which a long-running deployment pays once, not per round.
    warmup = make("warm-up", 1)
    job = make("benchmark", rounds)
    # Each board is a process of its own, as on a real fleet: 20 trainers in one
    # interpreter would share its GIL and measure that, not the system.
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    results: Any = ctx.Queue()
    boards = [
        ctx.Process(
            target=_board,
            kwargs={
                "url": stack.url,
                "secret": secret,
                "state_dir": str(work / "agents" / f"dev{i}"),
                "x": parts[i][0],
                "y": parts[i][1],
                "public_key": public_key,
                "device_seed": i,
                "stop": stop,
                "results": results,
            },
            daemon=True,
        )
        for i, secret in enumerate(secrets)
    ]
    outcomes: list[Any] = []
    wire: dict[int, tuple[int, int]] = {}
    at_start: dict[int, tuple[int, int]] = {}

    def drain() -> None:
        while True:
            try:
                kind, index, payload, counted = results.get_nowait()
            except queue.Empty:
                return
            wire[index] = counted
            if kind == "outcome":
                outcomes.append(payload)

    try:
        stack.start_web(workers=2, wait=False)
        stack.start_worker("bench", concurrency=1)
        for board in boards:
            board.start()
        stack.wait_web(timeout=60)
        _run_job(services, warmup.pk, timeout=300, stack=stack, poll=drain)
        drain()
        at_start = dict(wire)
        outcomes.clear()
        started = time.perf_counter()
        status = _run_job(services, job.pk, timeout=60 * rounds + 120, stack=stack, poll=drain)
        wall = time.perf_counter() - started
    finally:
        stop.set()
        deadline = time.monotonic() + 30
        for board in boards:
            while board.is_alive() and time.monotonic() < deadline:
                drain()
                board.join(timeout=0.1)
            if board.is_alive():
                board.terminate()
        drain()
        stack.close()
    if status != "succeeded":
        raise RuntimeError(f"job ended {status}: {stack.log('worker')[-3000:]}")
    done = list(FederatedRound.objects.filter(job_id=job.pk).order_by("number"))
    return {
        "phases": _phases(done, outcomes),
        "program": program,
        "initial": initial,
        "job_seed": int(job.seed),
        "wall_s": wall,
        "accuracy_per_round": [float(r.accuracy or 0.0) for r in done],
        "bytes_in": sum(r.bytes_in for r in done),
        "bytes_out": sum(r.bytes_out for r in done),
        "wire_bytes": sum(wire[i][0] - at_start.get(i, (0, 0))[0] for i in wire),
        "requests": sum(wire[i][1] - at_start.get(i, (0, 0))[1] for i in wire),
    }


PHASES = (
    ("wait_s", "open -> task received"),
    ("download_s", "download (program, weights)"),
    ("train_s", "train (incl. encode)"),
    ("upload_s", "upload"),
    ("last_to_closed_s", "last upload answered -> closed"),
    ("closed_to_aggregated_s", "closed -> aggregation start"),
    ("aggregate_s", "aggregate"),
    ("evaluate_s", "register + evaluate"),
    ("done_to_next_s", "version -> next open"),
    ("collect_s", "round open -> closed"),
    ("closed_to_next_s", "closed -> next open"),
)


def _phases(done: list[Any], outcomes: list[Any]) -> dict[str, dict[str, float]]:
    """Per-round phase costs, as medians over the rounds: for the devices' phases both the
    median device and the slowest one (a round waits for its last device)."""
    by_round: dict[int, list[Any]] = {}
    for outcome in outcomes:
        if outcome.status == "uploaded" and outcome.timings:
            by_round.setdefault(outcome.round_id, []).append(outcome.timings)
    rows: dict[str, list[tuple[float, float]]] = {key: [] for key, _ in PHASES}
    for i, rnd in enumerate(done):
        timings = by_round.get(rnd.pk, [])
        opened = rnd.opened_at.timestamp() if rnd.opened_at else None
        if timings and opened is not None:
            waits = [t["received_at"] - opened for t in timings]
            rows["wait_s"].append((float(np.median(waits)), max(waits)))
            for key in ("download_s", "train_s", "upload_s"):
                values = [t.get(key, 0.0) for t in timings]
                rows[key].append((float(np.median(values)), max(values)))
            if rnd.closed_at is not None:
                last = max(t["uploaded_at"] for t in timings)
                gap = rnd.closed_at.timestamp() - last
                rows["last_to_closed_s"].append((gap, gap))
        # The aggregation starts when the worker claims the round; its own clock says how
        # long it and the evaluation took, so the rest of closed -> finished is the hop.
        agg = float(rnd.aggregate_s or 0.0)
        ev = float(rnd.evaluate_s or 0.0)
        hop = _seconds(rnd.closed_at, rnd.finished_at) - agg - ev
        rows["closed_to_aggregated_s"].append((hop, hop))
        rows["aggregate_s"].append((agg, agg))
        rows["evaluate_s"].append((ev, ev))
        collect = _seconds(rnd.opened_at, rnd.closed_at)
        rows["collect_s"].append((collect, collect))
        if i + 1 < len(done):
            gap = _seconds(rnd.finished_at, done[i + 1].opened_at)
            rows["done_to_next_s"].append((gap, gap))
            # Negative "version -> next open": the next round opened while this one's
            # version was still being evaluated.
            between = _seconds(rnd.closed_at, done[i + 1].opened_at)
            rows["closed_to_next_s"].append((between, between))
    return {
        key: {
            "median": float(np.median([m for m, _ in values])) if values else 0.0,
            "slowest": float(np.median([s for _, s in values])) if values else 0.0,
        }
        for key, values in rows.items()
    }


def run_reference(
    *,
    program: bytes,
    initial: dict[str, np.ndarray],
    job_seed: int,
    devices: int,
    rounds: int,
    codec: str = "none",
    topk_fraction: float = 0.1,
) -> dict[str, Any]:
    """The plain loop: the same backend code and seeds, a float64 weighted average."""
    from config.demo.nets import spec_fields
    from devices_agent.backends import TrainConfig, get_backend
    from devices_agent.codecs import decode_delta, encode_delta
    from devices_agent.family import FamilySpec
    from devices_agent.federated import local_seed
    from devices_agent.program import trainable_names

    fields = spec_fields(ARCH)
    spec = FamilySpec(
        task=fields["task"], input_shape=tuple(fields["input_shape"]), num_classes=fields["num_classes"]
    )
    backend = get_backend("torch", num_threads=1)
    names = trainable_names(program)
    parts, x_test, y_test = _data(devices)
    state = {k: np.asarray(v, np.float32) for k, v in initial.items()}
    expected = {k: (tuple(state[k].shape), "float32") for k in names}
    residuals: list[Any] = [None] * devices
    accuracies: list[float] = []
    sent = 0
    started = time.perf_counter()
    for number in range(1, rounds + 1):
        # What the round task says: training.selectors.round_task.
        task_seed = job_seed * 100_003 + number
        sums = {k: np.zeros(state[k].shape, np.float64) for k in names}
        total = 0.0
        for i, (x, y) in enumerate(parts):
            result = backend.train(
                program=program,
                state=state,
                spec=spec,
                x=x,
                y=y,
                config=TrainConfig(
                    epochs=EPOCHS,
                    batch_size=BATCH,
                    lr=LR,
                    seed=local_seed(task_seed=task_seed, device_seed=i),
                ),
                trainable=names,
            )
            delta = result.delta
            if codec != "none":
                encoded = encode_delta(delta, codec=codec, topk_fraction=topk_fraction, residual=residuals[i])
                residuals[i] = encoded.residual
                sent += len(encoded.data)
                delta = decode_delta(encoded.data, expected=expected)
            else:
                sent += len(encode_delta(delta, codec="none").data)
            for k in sums:
                sums[k] += result.num_examples * delta[k].astype(np.float64)
            total += result.num_examples
        state = {
            **state,
            **{k: (state[k].astype(np.float64) + sums[k] / total).astype(np.float32) for k in names},
        }
        measured = backend.evaluate(program=program, state=state, spec=spec, x=x_test, y=y_test)
        accuracies.append(float(measured["accuracy"]))
    return {
        "wall_s": time.perf_counter() - started,
        "accuracy_per_round": accuracies,
        "bytes_per_round": sent / rounds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--devices", type=int, default=20)
    args = parser.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 30)
    devices = args.devices

    import torch

    torch.set_num_threads(1)
    # The machine may be shared: the load says how much of it this run had.
    load_before = os.getloadavg()[0]
    system = run_system(devices=devices, rounds=rounds)
    model = {"program": system["program"], "initial": system["initial"], "job_seed": system["job_seed"]}
    reference = run_reference(devices=devices, rounds=rounds, **model)
    overhead = (system["wall_s"] - reference["wall_s"]) / rounds
    final = system["accuracy_per_round"][-1]
    ref_final = reference["accuracy_per_round"][-1]

    print(
        f"federated benchmark: digits 80/20 (seed 0), {devices} devices Dirichlet({ALPHA}), MLP 64-64-10, "
        f"{EPOCHS} local epochs, batch {BATCH}, SGD lr {LR}, {rounds} rounds, FedAvg, all devices per round; "
        f"{os.cpu_count()} CPUs shared by server, worker and the simulated devices; "
        f"load average before the run {load_before:.1f}"
    )
    header = f"{'round':>5}{'system acc':>12}{'plain loop acc':>16}"
    print(header)
    print("-" * len(header))
    for i, (a, b) in enumerate(
        zip(system["accuracy_per_round"], reference["accuracy_per_round"], strict=True)
    ):
        print(f"{i + 1:>5}{a:>12.4f}{b:>16.4f}")
    print()
    print(f"{'':<34}{'system':>12}{'plain loop':>12}{'ratio':>8}")
    print(
        f"{'wall time (s)':<34}{system['wall_s']:>12.2f}{reference['wall_s']:>12.2f}"
        f"{system['wall_s'] / reference['wall_s']:>8.2f}"
    )
    print(f"{'final accuracy':<34}{final:>12.4f}{ref_final:>12.4f}")
    print(f"{'overhead per round (s)':<34}{overhead:>12.3f}")
    print(
        f"{'deltas up per round (KB)':<34}{system['bytes_in'] / rounds / 1024:>12.1f}"
        f"{reference['bytes_per_round'] / 1024:>12.1f}"
    )
    print(f"{'weights down per round (KB)':<34}{system['bytes_out'] / rounds / 1024:>12.1f}")
    print(f"{'all HTTP bytes per round (KB)':<34}{system['wire_bytes'] / rounds / 1024:>12.1f}")
    print(f"{'HTTP requests per round':<34}{system['requests'] / rounds:>12.1f}")
    print()
    print("where a round's time goes (s, medians over the rounds; devices: median and slowest device):")
    header = f"{'phase':<34}{'median':>10}{'slowest':>10}"
    print(header)
    print("-" * len(header))
    for key, label in PHASES:
        row = system["phases"][key]
        print(f"{label:<34}{row['median']:>10.3f}{row['slowest']:>10.3f}")
    print(f"{'plain loop: training 1 round (s)':<34}{reference['wall_s'] / rounds:>10.3f}")
    print(f"goals: |system - plain| <= 1 pt ({abs(final - ref_final) * 100:.2f} pt), overhead < 0.25 s/round")
    print()

    codecs = [("none", 0.1), ("fp16", 0.1), ("int8", 0.1), ("topk", 0.1), ("topk", 0.05)]
    rows = []
    for codec, fraction in codecs:
        if codec == "none":
            result = reference
        else:
            result = run_reference(
                devices=devices, rounds=rounds, codec=codec, topk_fraction=fraction, **model
            )
        label = f"topk {fraction:g}" if codec == "topk" else codec
        rows.append(
            {
                "codec": label,
                "bytes_per_round": int(result["bytes_per_round"]),
                "final_accuracy": result["accuracy_per_round"][-1],
            }
        )
    base = rows[0]
    print("codecs (through the plain loop with each codec applied to the deltas):")
    header = f"{'codec':<10}{'KB/round':>10}{'x fewer':>9}{'final acc':>11}{'delta pt':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['codec']:<10}{row['bytes_per_round'] / 1024:>10.1f}"
            f"{base['bytes_per_round'] / row['bytes_per_round']:>9.2f}{row['final_accuracy']:>11.4f}"
            f"{(row['final_accuracy'] - base['final_accuracy']) * 100:>+10.2f}"
        )
    print("goals: int8 4x fewer bytes within 0.5 pt; top-k 10% 8x fewer within 1 pt")
    if args.json:
        print(
            json.dumps(
                {
                    "final_accuracy": round(final, 4),
                    "reference_accuracy": round(ref_final, 4),
                    "accuracy_per_round": [round(a, 4) for a in system["accuracy_per_round"]],
                    "reference_accuracy_per_round": [round(a, 4) for a in reference["accuracy_per_round"]],
                    "wall_s": round(system["wall_s"], 3),
                    "reference_wall_s": round(reference["wall_s"], 3),
                    "overhead_per_round_s": round(overhead, 4),
                    "bytes_per_round": int((system["bytes_in"] + system["bytes_out"]) / rounds),
                    "wire_bytes_per_round": int(system["wire_bytes"] / rounds),
                    "codecs": rows,
                    "rounds": rounds,
                    "devices": devices,
                    "load_average_before": round(load_before, 2),
                    "phases": {
                        k: {m: round(v, 4) for m, v in row.items()} for k, row in system["phases"].items()
                    },
                }
            )
        )


if __name__ == "__main__":
    main()
