"""Boards that learn a family: agent processes fed by their applications, a federated job
through the live stack, next to a plain PyTorch loop on the same data.

    python -m benchmarks.board_learning [--quick] [--json] [--boards N] [--rounds R]

What it does, in one run on this machine:

1. **stack**: a scratch data directory, the production settings, SQLite, an embedded
   Redis-protocol server, uvicorn (one process) and one Celery worker as real processes
   (``config.stack.Stack``). The ``activity`` family (a 1-D CNN over 3-axis accelerometer
   windows ``[3, 64]``, six activities) is registered through the REST API as a user
   would (``config.demo.seed.seed_activity_family``: trained for a few epochs on neutral
   public windows, bundled, uploaded, promoted), with its boards' group and enrollment
   token (``seed_activity_fleet``). The family has no test set.
2. **boards**: ``--boards`` (default 12; 4 with ``--quick``) ``python -m devices_agent run``
   processes, each with its own config file, state directory and local API socket; they
   enroll, the version is assigned to each, and each downloads, verifies, health-checks
   and installs it. Personalisation is off on these boards: it would load torch before
   the first round and answer predictions with a head of its own, and this run measures
   a serving board's footprint and the global model's latency.
3. **applications**: beside each board, a generated application
   (``devices_agent.simulate.GeneratedApp``) holding one simulated person's windows
   (``devices_agent.data.activity_windows``: their own style and mix of activities) talks
   to the agent over its socket with ``devices_agent.local_client.AgentClient``: 60 % of
   the windows as labelled history (``add_samples``), then predictions each followed by
   the right answer (``feedback``), until the board holds all 240 of its windows (about
   20 % of them fall into its local holdout). Nothing more is fed during the job.
4. **latency**: single predictions of one of board 0's windows through the local API
   client (Unix socket, HTTP/1.1, raw float32 body, JSON answer, metrics and drift
   sketch on the agent's side), interleaved in blocks with bare ONNX Runtime
   ``session.run`` on the same model file and the same input in this process (one
   intra-op thread, as the agent's session). Medians; the outputs are compared.
5. **memory**: RSS of every agent process (psutil on the child pids) once its model is
   installed and its examples held, before any round (idle), and sampled every 0.2 s
   during the job (peak: loading torch, the program, training), next to the kernel's
   high-water mark (``VmHWM``) before and after the job; whether libtorch is mapped into
   each. Baselines in the same run: a bare Python process holding an ONNX Runtime
   session of the model, and the peak of a bare Python process that trains the program
   once on board 0's examples with the same backend.
6. **job**: FedAvg, ``--rounds`` rounds (default 5; 2 with ``--quick``), every board in
   every round, 3 local epochs, batch 32, SGD lr 0.05, codec ``none`` (``--codec``),
   seed 0. Each version is judged on the boards' holdouts by the next round's boards
   (the last one by an evaluation round); the final metric is the holdout accuracy of
   the last version, weighted by holdout examples, as the server computes it.
7. **reference**: the boards are stopped and their own sample stores read back
   (``devices_agent.learning.LocalData``: the training part and the holdout, in the
   order the trainer read them); the same rounds as a plain loop in this process on the
   program and weights the server stored: ``TorchBackend.train`` (one thread) with the
   seeds the boards used (``local_seed`` of the round task's seed and the board's
   device seed), the boards each round's updates came from, a float64 average weighted
   by examples, then ``TorchBackend.evaluate`` on every board's holdout. The server's
   FedAvg forms each weight x delta in float32 before its float64 sum, so the two
   models differ in the last bits of float32 and, now and then, in the answer to a
   holdout example or two; the largest weight difference of the last version is shown.

Boards, rounds and the rest of the defaults fit this 2-core machine: with 12 boards and 5
rounds, two runs took 2.6 and 3.0 minutes here (while other jobs shared the machine). The
first round took about a minute: each board imports torch and loads its first program
then (50 to 56 CPU seconds for the twelve); later rounds took 2 to 9 seconds (about 2.5
CPU seconds for the twelve). An agent process that has trained holds about 425 MB.

With ``--json`` the last line is one JSON object with ``family``, ``task``, ``boards``,
``boards_as_processes``, ``final_metric``, ``reference_metric``, ``predict_p50_ms``,
``bare_p50_ms``, ``idle_rss_mb``, ``train_rss_mb`` and the rest of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import boards as harness

BOARDS = 12
QUICK_BOARDS = 4
ROUNDS = 5
QUICK_ROUNDS = 2
EPOCHS = 3
BATCH = 32
LR = 0.05
JOB_SEED = 0
ROUND_DEADLINE_S = 600
PREDICT_OVERHEAD_GOAL_MS = 0.3


def _progress(message: str) -> None:
    print(f"[board_learning] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- baselines


def _baseline_child(kind: str, folder: Path) -> None:
    """A bare process: hold an ONNX Runtime session (idle), or train the program once (train)."""
    import psutil

    if kind == "idle":
        from devices_agent.inference import load_session

        session = load_session((folder / "model.onnx").read_bytes(), threads=1)
        with np.load(folder / "train.npz") as data:
            x = np.ascontiguousarray(data["x"][:1])
        session.run(None, {session.get_inputs()[0].name: x})
    else:
        from devices_agent.backends import TrainConfig, get_backend
        from devices_agent.codecs import decode_tensors
        from devices_agent.family import FamilySpec

        spec = FamilySpec.from_dict(json.loads((folder / "spec.json").read_text()))
        tensors, _ = decode_tensors((folder / "weights.safetensors").read_bytes())
        with np.load(folder / "train.npz") as data:
            x, y = data["x"], data["y"]
        get_backend("torch", num_threads=1).train(
            program=(folder / "program.json").read_bytes(),
            state={k: np.asarray(v) for k, v in tensors.items()},
            spec=spec,
            x=x,
            y=y,
            config=TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=0),
        )
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork and exec.
    peak = harness.peak_rss_mb(os.getpid())
    print(json.dumps({"rss_mb": psutil.Process().memory_info().rss / 1e6, "peak_mb": peak}))


def _baseline(kind: str, folder: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.board_learning", "--baseline", kind, "--folder", str(folder)],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- phases


def _feed(boards: list[harness.Board], apps: list[Any], *, per_cycle: int = 8) -> dict[str, int]:
    """Play every board's application round-robin until each board holds all its windows."""
    from devices_agent.local_client import AgentClient

    clients = [AgentClient(str(b.socket)) for b in boards]
    held = [0] * len(boards)
    pending = set(range(len(boards)))
    try:
        while pending:
            for i in sorted(pending):
                app = apps[i]
                app.step(clients[i], predictions=min(per_cycle, len(app.y) - held[i]))
                held[i] = int(clients[i].status()["examples"])
                if held[i] >= len(app.y):
                    pending.discard(i)
            harness.alive(boards)
        counts = [clients[i].status() for i in range(len(boards))]
    finally:
        for client in clients:
            client.close()
    return {
        "examples": sum(c["examples"] for c in counts),
        "training_examples": sum(c["training_examples"] for c in counts),
        "holdout_examples": sum(c["holdout_examples"] for c in counts),
        "min_holdout": min(c["holdout_examples"] for c in counts),
        "predictions": sum(a.predictions for a in apps),
    }


def _latency(
    board: harness.Board, onnx: bytes, x: np.ndarray, *, blocks: int, per_block: int
) -> dict[str, Any]:
    """p50 of a prediction through the local API vs bare ``session.run``, interleaved in blocks."""
    from devices_agent.inference import load_session
    from devices_agent.local_client import AgentClient

    session = load_session(onnx, threads=1)
    name = session.get_inputs()[0].name
    one = np.ascontiguousarray(x[None], dtype=np.float32)
    api: list[float] = []
    bare: list[float] = []
    with AgentClient(str(board.socket)) as client:
        for _ in range(50):  # the connection, the agent's session and caches warm up
            client.predict(x)
            session.run(None, {name: one})
        for _ in range(blocks):
            for _ in range(per_block):
                started = time.perf_counter_ns()
                client.predict(x)
                api.append((time.perf_counter_ns() - started) / 1e6)
            for _ in range(per_block):
                started = time.perf_counter_ns()
                session.run(None, {name: one})
                bare.append((time.perf_counter_ns() - started) / 1e6)
        answer = client.predict(x)
    expected = np.asarray(session.run(None, {name: one})[0], dtype=np.float64).ravel()
    return {
        "predict_p50_ms": float(statistics.median(api)),
        "predict_p95_ms": float(np.percentile(api, 95)),
        "bare_p50_ms": float(statistics.median(bare)),
        "bare_p95_ms": float(np.percentile(bare, 95)),
        "predictions_timed": len(api),
        "served_by": answer["model"],
        "max_abs_diff": float(np.max(np.abs(np.asarray(answer["outputs"]) - expected))),
    }


def _run_job(
    group: Any, version: Any, *, pids: list[int], rounds: int, codec: str
) -> tuple[Any, float, dict[int, float]]:
    """Create and start the job and wait for it, reporting round transitions.

    Returns the job, its wall time, and the CPU seconds the boards used from each round's
    opening to the next one's (for the last, to the end of the job).
    """
    boards = len(pids)
    from django.db import close_old_connections

    from training import services
    from training.models import FederatedJob, FederatedRound

    job = services.job_create(
        actor=None,
        family=version.family,
        base_version=version,
        target_group=group,
        name="board learning benchmark",
        rounds=rounds,
        min_clients=boards,
        quorum=boards,
        local_epochs=EPOCHS,
        batch_size=BATCH,
        lr=LR,
        strategy="fedavg",
        codec=codec,
        round_deadline_s=ROUND_DEADLINE_S,
        seed=JOB_SEED,
    )
    started = time.monotonic()
    services.job_start(job_id=job.pk, actor=None)
    seen: tuple[Any, ...] = ()
    cpu_at: dict[int, float] = {}
    while True:
        close_old_connections()
        status = FederatedJob.objects.filter(pk=job.pk).values_list("status", flat=True).first()
        latest = FederatedRound.objects.filter(job_id=job.pk).order_by("-number").first()
        if latest is not None:
            answered = latest.updates.count()
            now = (latest.number, latest.kind, latest.status, answered)
            if latest.number not in cpu_at:
                cpu_at[latest.number] = harness.cpu_s(pids)
            if now != seen:
                seen = now
                _progress(
                    f"round {latest.number} ({latest.kind}): {latest.status}, {answered}/{boards} boards "
                    f"answered, {time.monotonic() - started:.0f} s"
                )
        if status in ("succeeded", "failed", "cancelled"):
            break
        if time.monotonic() - started > ROUND_DEADLINE_S * (rounds + 1):
            raise TimeoutError("the federated job did not end")
        time.sleep(0.5)
    wall = time.monotonic() - started
    end = harness.cpu_s(pids)
    job.refresh_from_db()
    if job.status != "succeeded":
        raise RuntimeError(f"the job ended {job.status}")
    numbers = sorted(cpu_at)
    cpu = {
        n: (cpu_at[numbers[k + 1]] if k + 1 < len(numbers) else end) - cpu_at[n]
        for k, n in enumerate(numbers)
    }
    return job, wall, cpu


def _rounds(job: Any, names: dict[str, int]) -> list[dict[str, Any]]:
    """Per round: its kind, metric, timing and the boards whose updates it used."""
    from training.models import ClientUpdate, FederatedRound

    out = []
    for rnd in FederatedRound.objects.filter(job=job).order_by("number"):
        updates = ClientUpdate.objects.filter(round=rnd, status="accepted").select_related("device")
        out.append(
            {
                "number": rnd.number,
                "kind": rnd.kind,
                "version_id": rnd.version_id,
                "metric": rnd.metric,
                "metric_name": rnd.metric_name,
                "evaluation": rnd.evaluation,
                "participants": rnd.participants,
                "wall_s": (rnd.finished_at - rnd.opened_at).total_seconds()
                if rnd.opened_at and rnd.finished_at
                else None,
                "boards": sorted(names[u.device.name] for u in updates),
                "num_examples": {names[u.device.name]: int(u.num_examples) for u in updates},
                "bytes_in": int(rnd.bytes_in),
                "bytes_out": int(rnd.bytes_out),
            }
        )
    return out


def _board_data(board: harness.Board, spec: Any) -> dict[str, Any]:
    """A stopped board's own examples, read as its trainer read them."""
    from devices_agent.learning import LocalData
    from devices_agent.samples import SampleStore

    store = SampleStore(board.state_dir / "samples.sqlite3", holdout_percent=harness.HOLDOUT_PERCENT)
    try:
        data = LocalData(store, holdout_percent=harness.HOLDOUT_PERCENT)
        train, holdout = data.training_set(spec), data.holdout_set(spec)
    finally:
        store.close()
    assert train is not None and holdout is not None, f"{board.name} holds no examples"
    return {"train": train, "holdout": holdout}


def run_reference(
    *,
    program: bytes,
    initial: dict[str, np.ndarray],
    spec: Any,
    data: list[dict[str, Any]],
    participants: list[list[int]],
    codec: str,
) -> dict[str, Any]:
    """The same rounds as a plain loop: TorchBackend, the boards' seeds, a float64 weighted average."""
    from devices_agent.backends import TrainConfig, get_backend
    from devices_agent.codecs import decode_delta, encode_delta
    from devices_agent.federated import local_seed
    from devices_agent.program import trainable_names

    backend = get_backend("torch", num_threads=1)
    names = trainable_names(program)
    state = {k: np.asarray(v) for k, v in initial.items()}
    expected = {k: (tuple(state[k].shape), "float32") for k in names}
    metric = spec.primary_metric

    def holdout_metric() -> float:
        values, weights = [], []
        for board in data:
            x, y = board["holdout"]
            values.append(float(backend.evaluate(program=program, state=state, spec=spec, x=x, y=y)[metric]))
            weights.append(float(len(x)))
        return float(np.average(values, weights=weights))

    metrics = [holdout_metric()]
    walls = []
    for number, chosen in enumerate(participants, start=1):
        started = time.perf_counter()
        task_seed = JOB_SEED * 100_003 + number  # what the round task says (training.selectors)
        sums = {k: np.zeros(state[k].shape, np.float64) for k in names}
        total = 0.0
        for i in chosen:
            x, y = data[i]["train"]
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
                delta = decode_delta(encode_delta(delta, codec=codec).data, expected=expected)
            for k in names:
                sums[k] += result.num_examples * delta[k].astype(np.float64)
            total += result.num_examples
        state = {
            **state,
            **{k: (state[k].astype(np.float64) + sums[k] / total).astype(np.float32) for k in names},
        }
        walls.append(time.perf_counter() - started)
        metrics.append(holdout_metric())
        _progress(f"plain loop round {number}: {metric} {metrics[-1]:.4f}")
    return {"metric_per_round": metrics, "wall_per_round_s": walls, "state": state}


# --------------------------------------------------------------------------- the run


def run(*, boards: int, rounds: int, codec: str, quick: bool) -> dict[str, Any]:
    from config.stack import Stack

    load_before = os.getloadavg()[0]
    phases: dict[str, float] = {}
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="flotilla-board-learning-"))
    with Stack.scratch(
        "flotilla-board-learning-stack-", production=True, heartbeat_interval_s=int(harness.HEARTBEAT_S)
    ) as stack:
        stack.migrate()
        stack.setup_django()
        stack.start_web(workers=1, wait=False)
        stack.start_worker("bench", concurrency=1)
        stack.wait_web(timeout=90)
        from config.demo.seed import seed_activity_family, seed_activity_fleet, seed_admin
        from devices_agent.codecs import decode_tensors
        from devices_agent.simulate import GeneratedApp, board_data
        from fleet.models import Device, DeviceGroup
        from fleet.services.devices import device_assign_version
        from models_registry.models import ModelVersion
        from models_registry.selectors import version_onnx, version_program

        admin, api_token = seed_admin(username="bench-admin", password=secrets.token_urlsafe(16))
        version_id = seed_activity_family(url=stack.url, api_token=api_token, say=_progress)
        version = ModelVersion.objects.select_related("family").get(pk=version_id)
        family = version.family
        spec = family.spec
        fleet = seed_activity_fleet(devices=boards, actor=admin)
        group = DeviceGroup.objects.get(name=fleet["group"])
        program = version_program(version=version)
        assert program is not None
        onnx = version_onnx(version=version)
        with version.artifacts.get(kind="weights").file.open("rb") as handle:
            weights_bytes = handle.read()
        initial = {k: np.asarray(v) for k, v in decode_tensors(weights_bytes)[0].items()}
        phases["stack and family"] = time.monotonic() - started

        _progress(f"starting {boards} flotilla-agent run processes")
        mark = time.monotonic()
        fleet_boards = [
            harness.spawn(root, i, url=stack.url, token=fleet["enrollment_token"]) for i in range(boards)
        ]
        logs = lambda: harness.logs(fleet_boards)  # noqa: E731
        try:
            members = Device.objects.filter(groups=group)

            def enrolled() -> bool:
                harness.alive(fleet_boards)
                return bool(members.count() == boards)

            harness.wait_for(enrolled, timeout=60 + 10 * boards, what="every board to enroll", logs=logs)
            phases["boards enrolled"] = time.monotonic() - mark
            enrolled_rss = [harness.rss_mb(b.pid) for b in fleet_boards]
            _progress(f"{boards} boards enrolled; assigning {version.label}")
            mark = time.monotonic()
            for device_id in members.values_list("pk", flat=True):
                device_assign_version(actor=None, device_id=device_id, version_id=version.pk)

            def installed() -> bool:
                harness.alive(fleet_boards)
                return all(
                    (s := harness.status(b)) is not None and s["version_id"] == version.pk
                    for b in fleet_boards
                )

            harness.wait_for(installed, timeout=60 + 10 * boards, what="the model on every board", logs=logs)
            phases["model installed everywhere"] = time.monotonic() - mark

            _progress("the applications feed their boards over the local API")
            mark = time.monotonic()
            apps = []
            for i in range(boards):
                x, y = board_data(dataset="activity", index=i, boards=boards, seed=0, alpha=0.5)
                apps.append(GeneratedApp(x=x, y=y, rng=random.Random(i)))
            fed = _feed(fleet_boards, apps)
            training_counts = {
                b.name: int((harness.status(b) or {})["training_examples"]) for b in fleet_boards
            }

            def reported() -> bool:
                harness.alive(fleet_boards)
                states = dict(members.values_list("name", "state"))
                return all(
                    (states.get(n) or {}).get("local_examples") == c for n, c in training_counts.items()
                )

            harness.wait_for(
                reported, timeout=120, what="every board to report its example counts", logs=logs
            )
            phases["applications fed every board"] = time.monotonic() - mark

            pids = [b.pid for b in fleet_boards]
            idle_rss = [harness.rss_mb(pid) for pid in pids]
            torch_idle = sum(harness.torch_mapped(pid) for pid in pids)
            _progress("timing predictions: local API vs bare onnxruntime")
            latency = _latency(
                fleet_boards[0],
                onnx,
                apps[0].x[-1],
                blocks=10 if quick else 20,
                per_block=100 if quick else 200,
            )

            folder = root / "baseline"
            folder.mkdir()
            (folder / "model.onnx").write_bytes(onnx)
            (folder / "program.json").write_bytes(program)
            (folder / "weights.safetensors").write_bytes(weights_bytes)
            (folder / "spec.json").write_text(json.dumps(spec.to_dict()))
            np.savez(folder / "train.npz", x=apps[0].x, y=apps[0].y)
            bare_idle = _baseline("idle", folder)

            _progress(f"federated job: {rounds} rounds on {boards} boards")
            names = {b.name: b.index for b in fleet_boards}
            hwm_before = [harness.peak_rss_mb(pid) for pid in pids]
            with harness.RssSampler(pids) as sampler:
                job, job_wall, job_cpu = _run_job(group, version, pids=pids, rounds=rounds, codec=codec)
            phases[f"federated job ({rounds} rounds + evaluation)"] = job_wall
            after_rss = [harness.rss_mb(pid) for pid in pids]
            hwm_after = [harness.peak_rss_mb(pid) for pid in pids]
            torch_after = sum(harness.torch_mapped(pid) for pid in pids)
            peak_rss = [sampler.peak[pid] for pid in pids]
            system_rounds = _rounds(job, names)
            last = [r for r in system_rounds if r["kind"] == "train"][-1]
            produced = ModelVersion.objects.get(pk=last["version_id"])
            with produced.artifacts.get(kind="weights").file.open("rb") as handle:
                final_weights = {k: np.asarray(v) for k, v in decode_tensors(handle.read())[0].items()}
            version.refresh_from_db()
            initial_metric = (version.metrics or {}).get(spec.primary_metric)
        finally:
            harness.stop(fleet_boards)
        bare_train = _baseline("train", folder)
        database = stack.database

    _progress("the plain loop on the boards' own examples")
    mark = time.monotonic()
    data = [_board_data(b, spec) for b in fleet_boards]
    train_rounds = [r for r in system_rounds if r["kind"] == "train"]
    for r in train_rounds:
        for i, n in r["num_examples"].items():
            held = len(data[i]["train"][1])
            if n != held:
                raise RuntimeError(
                    f"round {r['number']}: board {i} trained on {n} examples, its store holds {held}"
                )
    reference = run_reference(
        program=program,
        initial=initial,
        spec=spec,
        data=data,
        participants=[r["boards"] for r in train_rounds],
        codec=codec,
    )
    phases["plain loop (reference)"] = time.monotonic() - mark

    system_metrics = [initial_metric] + [r["metric"] for r in train_rounds]
    plain = reference["state"]
    weights_diff = max(float(np.max(np.abs(final_weights[k] - plain[k]))) for k in plain)
    final = [r for r in system_rounds if r["kind"] == "evaluate"]
    final_metric = final[-1]["metric"] if final else train_rounds[-1]["metric"]
    return {
        "family": family.name,
        "task": spec.task,
        "metric": spec.primary_metric,
        "boards": boards,
        "boards_as_processes": True,
        "rounds": rounds,
        "local_epochs": EPOCHS,
        "batch_size": BATCH,
        "lr": LR,
        "codec": codec,
        "final_metric": final_metric,
        "reference_metric": reference["metric_per_round"][-1],
        "metric_per_round": system_metrics,
        "reference_metric_per_round": reference["metric_per_round"],
        "round_wall_s": [r["wall_s"] for r in train_rounds],
        "reference_round_wall_s": reference["wall_per_round_s"],
        "participants_per_round": [len(r["boards"]) for r in train_rounds],
        "board_cpu_s_per_round": [job_cpu.get(r["number"]) for r in train_rounds],
        "board_cpu_s_evaluation": sum(
            job_cpu.get(r["number"], 0.0) for r in system_rounds if r["kind"] != "train"
        ),
        "max_abs_weight_diff": weights_diff,
        "bytes_per_round": int(np.mean([r["bytes_in"] + r["bytes_out"] for r in train_rounds])),
        "job_wall_s": job_wall,
        "examples": fed,
        **latency,
        "predict_overhead_ms": latency["predict_p50_ms"] - latency["bare_p50_ms"],
        "enrolled_rss_mb": statistics.median(enrolled_rss),
        "idle_rss_mb": statistics.median(idle_rss),
        "idle_rss_max_mb": max(idle_rss),
        "train_rss_mb": statistics.median(peak_rss),
        "train_rss_max_mb": max(peak_rss),
        "after_job_rss_mb": statistics.median(after_rss),
        "peak_rss_before_job_mb": statistics.median(hwm_before),
        "peak_rss_after_job_mb": statistics.median(hwm_after),
        "rss_samples": sampler.samples,
        "torch_loaded_idle": torch_idle,
        "torch_loaded_after_job": torch_after,
        "bare_session_rss_mb": bare_idle["rss_mb"],
        "bare_train_peak_rss_mb": bare_train["peak_mb"],
        "phases_s": phases,
        "total_s": time.monotonic() - started,
        "database": database,
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "quick": quick,
    }


def _print(r: dict[str, Any]) -> None:
    metric = r["metric"]
    print(
        f"board learning benchmark: family {r['family']} ({r['task']}), {r['boards']} boards as "
        f"flotilla-agent run processes fed over their local API sockets, FedAvg {r['rounds']} rounds x "
        f"{r['local_epochs']} local epochs, batch {r['batch_size']}, SGD lr {r['lr']}, codec {r['codec']}; "
        f"database={r['database']}, {r['cpus']} CPUs shared by web, worker and boards; "
        f"load average before the run {r['load_average_before']:.1f}"
    )
    ex = r["examples"]
    print(
        f"examples on the boards: {ex['examples']} ({ex['training_examples']} training, "
        f"{ex['holdout_examples']} holdout, at least {ex['min_holdout']} per board); "
        f"{ex['predictions']} of them came as predictions with feedback"
    )
    print()
    header = f"{'phase':<44}{'s':>8}"
    print(header)
    print("-" * len(header))
    for name, seconds in r["phases_s"].items():
        print(f"{name:<44}{seconds:>8.1f}")
    print(f"{'whole run':<44}{r['total_s']:>8.1f}")
    print()
    header = (
        f"{'round':>5}{'system ' + metric:>19}{'plain loop':>12}{'diff pt':>9}{'boards':>8}"
        f"{'system s':>10}{'board CPU s':>13}{'plain s':>9}"
    )
    print(
        f"holdout {metric} of each round's version, weighted by holdout examples (0: the uploaded version);"
    )
    print(
        "system s: round opened -> version registered; board CPU s: all boards' CPU from one round's "
        "opening to the next; plain s: the plain loop's round (one thread)"
    )
    print(header)
    print("-" * len(header))
    for number, (a, b) in enumerate(zip(r["metric_per_round"], r["reference_metric_per_round"], strict=True)):
        shown = f"{a:>19.4f}" if a is not None else f"{'-':>19}"
        diff = f"{(a - b) * 100:>+9.2f}" if a is not None else f"{'':>9}"
        row = f"{number:>5}{shown}{b:>12.4f}{diff}"
        if number:
            cpu = r["board_cpu_s_per_round"][number - 1]
            row += (
                f"{r['participants_per_round'][number - 1]:>8}{r['round_wall_s'][number - 1] or 0.0:>10.1f}"
                f"{cpu if cpu is not None else float('nan'):>13.1f}"
                f"{r['reference_round_wall_s'][number - 1]:>9.1f}"
            )
        print(row)
    print(
        f"final: system {r['final_metric']:.4f}, plain loop {r['reference_metric']:.4f} "
        f"({(r['final_metric'] - r['reference_metric']) * 100:+.2f} pt); max |weight difference| of "
        f"the last version {r['max_abs_weight_diff']:.1e}; weights and deltas per round "
        f"{r['bytes_per_round'] / 1024:.0f} KB"
    )
    print()
    header = f"{'predict, one window (ms)':<46}{'p50':>8}{'p95':>8}"
    print(header)
    print("-" * len(header))
    print(f"{'bare onnxruntime session.run (baseline)':<46}{r['bare_p50_ms']:>8.3f}{r['bare_p95_ms']:>8.3f}")
    print(
        f"{'AgentClient.predict over the local API':<46}"
        f"{r['predict_p50_ms']:>8.3f}{r['predict_p95_ms']:>8.3f}"
    )
    print(
        f"overhead of the local API: {r['predict_overhead_ms']:.3f} ms "
        f"(goal <= {PREDICT_OVERHEAD_GOAL_MS} ms), {r['predict_p50_ms'] / r['bare_p50_ms']:.1f}x; "
        f"{r['predictions_timed']} timed predictions each, served by the {r['served_by']} model, "
        f"max |api - bare| {r['max_abs_diff']:.1e}"
    )
    print()
    header = f"{'memory per process (RSS MB)':<52}{'median':>8}{'max':>8}"
    print(header)
    print("-" * len(header))
    print(f"{'bare python holding an onnxruntime session (baseline)':<52}{r['bare_session_rss_mb']:>8.1f}")
    print(f"{'agent enrolled, no model yet':<52}{r['enrolled_rss_mb']:>8.1f}")
    print(
        f"{'agent idle: model installed, examples held':<52}"
        f"{r['idle_rss_mb']:>8.1f}{r['idle_rss_max_mb']:>8.1f}"
    )
    print(
        f"{'bare python training the program once, peak (baseline)':<52}{r['bare_train_peak_rss_mb']:>8.1f}"
    )
    print(
        f"{'agent peak during the job (sampled)':<52}{r['train_rss_mb']:>8.1f}{r['train_rss_max_mb']:>8.1f}"
    )
    print(f"{'agent after the job':<52}{r['after_job_rss_mb']:>8.1f}")
    print(
        f"kernel high-water mark (VmHWM) of the agents: {r['peak_rss_before_job_mb']:.1f} MB before the job, "
        f"{r['peak_rss_after_job_mb']:.1f} MB after it"
    )
    print(
        f"libtorch mapped: {r['torch_loaded_idle']}/{r['boards']} boards idle, "
        f"{r['torch_loaded_after_job']}/{r['boards']} after the job; "
        f"{r['rss_samples']} samples during the job"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_BOARDS} boards, {QUICK_ROUNDS} rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--boards", type=int, default=None, help=f"agent processes (default {BOARDS})")
    parser.add_argument("--rounds", type=int, default=None, help=f"federated rounds (default {ROUNDS})")
    parser.add_argument("--codec", choices=("none", "fp16", "int8"), default="none")
    parser.add_argument("--baseline", choices=("idle", "train"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline:
        _baseline_child(args.baseline, Path(args.folder))
        return
    boards = args.boards or (QUICK_BOARDS if args.quick else BOARDS)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    if boards < 1 or rounds < 1:
        parser.error("--boards and --rounds must be at least 1")
    r = run(boards=boards, rounds=rounds, codec=args.codec, quick=args.quick)
    _print(r)
    if args.json:
        print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
