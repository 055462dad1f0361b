"""On-device training with ONNX Runtime against PyTorch: step time, memory, parity, a mixed round.

    python -m benchmarks.ort_training [--quick] [--json]

For each family (the digits MLP 64-64-64-10, the activity 1-D CNN over [3, 64] windows):

1. **steps**: the training step at batch 32 (forward, loss, gradients, plain SGD update)
   timed in a process of its own per runtime, one intra-op thread each: PyTorch in the
   project's environment (the program loaded without pickle), ONNX Runtime in a
   torch-less board's environment (``config.board_env``) from the version's training
   artifacts, built by the pinned builder. The median of the timed steps after a warm-up;
   the peak RSS is the process's high-water mark (imports included: that is what a board
   pays).
2. **parity**: both backends' ``train`` from the same weights on the same examples in
   the same order with the same SGD settings; the largest difference in any parameter.
3. **mixed round**: the whole system (web server, worker, a fresh SQLite database) runs
   the same digits job twice on the same three data partitions: once with three torch
   boards, once with two torch boards and one torch-less board. The boards run the
   device-side trainer (``devices_agent.federated``) over HTTP: the torch ones as threads
   here, the torch-less one as a process in its environment. The final metric of each job
   is the central test accuracy of its last round's version.

With ``--json`` the last line is one JSON object with ``cases`` (each with ``family``,
``ort_step_ms``, ``torch_step_ms``, ``ort_peak_rss_mb``, ``torch_peak_rss_mb``,
``param_max_abs_diff``), ``mixed_round_final_metric``, ``torch_round_final_metric`` and the
run's parameters.

This file is also the child program of the measurements (``--child``): run by path in
either environment, it imports only the standard library and numpy at the top.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CASES = {"digits": "mlp", "activity": "activity"}
BATCH = 32
LR = 0.05


# --------------------------------------------------------------------------- children


def _peak_rss_mb() -> float:
    # VmHWM is this program's own high-water mark; getrusage's maxrss would include the
    # memory of the parent the child was forked from (the benchmark holds torch).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _batches(x: np.ndarray, y: np.ndarray, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        pick = rng.integers(0, len(x), size=BATCH)
        out.append((np.ascontiguousarray(x[pick]), np.ascontiguousarray(y[pick])))
    return out


def _child_torch_steps(work: Path, warmup: int, steps: int) -> dict[str, float]:
    import torch

    from devices_agent.codecs import decode_tensors
    from devices_agent.program import load_program

    torch.set_num_threads(1)
    data = np.load(work / "data.npz")
    state, _ = decode_tensors((work / "weights.safetensors").read_bytes())
    spec = json.loads((work / "spec.json").read_text())
    module = load_program((work / "program.json").read_bytes(), state, input_shape=spec["input_shape"])
    params = list(module.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    times = []
    for i, (xb, yb) in enumerate(_batches(data["x"], data["y"], warmup + steps)):
        started = time.perf_counter()
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(torch.from_numpy(xb)), torch.from_numpy(yb))
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return {"step_ms": statistics.median(times) * 1000.0, "peak_rss_mb": _peak_rss_mb()}


def _child_ort_steps(work: Path, warmup: int, steps: int) -> dict[str, float]:
    import onnxruntime

    from devices_agent.backends.ort_backend import training_api
    from devices_agent.codecs import decode_tensors
    from devices_agent.ort_artifacts import unpack

    api = training_api()
    folder = work / "ort"
    unpack((work / "ort_training.tar.gz").read_bytes(), folder)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = api.Module(
        str(folder / "training_model.onnx"), state, str(folder / "eval_model.onnx"), session_options=options
    )
    opt = api.Optimizer(str(folder / "optimizer_sgd.onnx"), module)
    opt.set_learning_rate(LR)
    weights, _ = decode_tensors((work / "weights.safetensors").read_bytes())
    for name, _param in state.parameters:
        state.parameters[name] = np.ascontiguousarray(weights[name], dtype=np.float32)
    data = np.load(work / "data.npz")
    module.train()
    times = []
    for i, (xb, yb) in enumerate(_batches(data["x"], data["y"], warmup + steps)):
        started = time.perf_counter()
        module(xb, yb)
        opt.step()
        module.lazy_reset_grad()
        if i >= warmup:
            times.append(time.perf_counter() - started)
    assert "torch" not in sys.modules
    return {"step_ms": statistics.median(times) * 1000.0, "peak_rss_mb": _peak_rss_mb()}


def _child_ort_train(work: Path, epochs: int) -> dict[str, float]:
    """The ort backend's train() on the case's data; the new parameters land in ort_new.npz."""
    from devices_agent.backends import TrainConfig, get_backend
    from devices_agent.codecs import decode_tensors
    from devices_agent.family import FamilySpec

    data = np.load(work / "data.npz")
    state, _ = decode_tensors((work / "weights.safetensors").read_bytes())
    spec = FamilySpec.from_dict(json.loads((work / "spec.json").read_text()))
    result = get_backend("ort", cache_dir=work / "cache").train(
        program=(work / "ort_training.tar.gz").read_bytes(),
        state=state,
        spec=spec,
        x=data["x"],
        y=data["y"],
        config=TrainConfig(epochs=epochs, batch_size=BATCH, lr=LR, seed=11),
    )
    arrays: dict[str, Any] = dict(result.delta)
    np.savez(work / "ort_delta.npz", **arrays)
    return {"steps": result.metrics["steps"]}


def _child_board(args: argparse.Namespace) -> None:
    """A torch-less board: the device-side trainer over HTTP until its parent stops it."""
    import base64
    import signal

    from devices_agent.client import AgentClient
    from devices_agent.federated import FederatedTrainer, FixedData, run_rounds

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    data = np.load(args.data)
    trainer = FederatedTrainer(
        client=AgentClient(server_url=args.server, secret=args.secret),
        state_dir=args.state,
        data=FixedData(data["x"], data["y"]),
        public_key=base64.b64decode(args.key),
        backends=["ort"],
        device_seed=int(args.seed),
        should_stop=stop.is_set,
    )
    assert "torch" not in sys.modules
    run_rounds(trainer, stop=stop, wait_s=2.0)


def _child(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["torch-steps", "ort-steps", "ort-train", "board"])
    parser.add_argument("--work", type=Path)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=2)
    for name in ("server", "secret", "key", "state", "data", "seed"):
        parser.add_argument(f"--{name}")
    args = parser.parse_args(argv)
    if args.mode == "board":
        _child_board(args)
        return
    runs = {
        "torch-steps": lambda: _child_torch_steps(args.work, args.warmup, args.steps),
        "ort-steps": lambda: _child_ort_steps(args.work, args.warmup, args.steps),
        "ort-train": lambda: _child_ort_train(args.work, args.epochs),
    }
    print(json.dumps(runs[args.mode]()), flush=True)


# --------------------------------------------------------------------------- the parent


def _run_child(python: Path, args: list[str], *, env: dict[str, str] | None, cwd: Path) -> dict[str, Any]:
    done = subprocess.run(
        [str(python), "-P", str(Path(__file__).resolve()), "--child", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed: {done.stderr[-3000:]}")
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


def _case_data(family: str) -> tuple[np.ndarray, np.ndarray]:
    from devices_agent.data import activity_windows, load_digits_split

    if family == "digits":
        x, y, _, _ = load_digits_split(seed=0)
        x, y = x[:320], y[:320]
    else:
        x, y = activity_windows(user=0, n=320, seed=0)
    return np.asarray(x, np.float32), np.asarray(y, np.int64)


def _prepare(family: str, work: Path, builder: Path) -> Any:
    """The case's bundle, data and ORT artifacts written into ``work``."""
    from config.demo.nets import bundle, spec_fields
    from devices_agent.family import FamilySpec
    from devices_agent.ort_artifacts import pack
    from models_registry.ml.ort_env import build_artifacts

    arch = CASES[family]
    made = bundle(arch)
    fields = spec_fields(arch)
    spec = FamilySpec(
        task=fields["task"], input_shape=tuple(fields["input_shape"]), num_classes=fields["num_classes"]
    )
    x, y = _case_data(family)
    work.mkdir(parents=True, exist_ok=True)
    np.savez(work / "data.npz", x=x, y=y)
    (work / "weights.safetensors").write_bytes(made.weights)
    (work / "program.json").write_bytes(made.program)
    (work / "spec.json").write_text(json.dumps(spec.to_dict()))
    answer = build_artifacts(
        python=builder,
        onnx=made.onnx,
        out=work / "built",
        task=spec.task,
        trainable=made.parameters,
        input_shape=list(spec.input_shape),
        input_dtype=spec.input_dtype,
        outputs=spec.outputs,
    )
    if not answer["ok"]:
        raise RuntimeError(f"{family} is not trainable with ORT: {answer}")
    (work / "ort_training.tar.gz").write_bytes(pack(work / "built", answer["manifest"]))
    return made, spec, x, y


def run_case(family: str, *, builder: Path, board: Any, quick: bool, root: Path) -> dict[str, Any]:
    from devices_agent.backends import TrainConfig, get_backend
    from devices_agent.codecs import decode_tensors

    work = root / family
    made, spec, x, y = _prepare(family, work, builder)
    warmup, steps = (20, 100) if quick else (50, 500)
    epochs = 2 if quick else 5
    timing = ["--work", str(work), "--warmup", str(warmup), "--steps", str(steps)]
    torch_steps = _run_child(Path(sys.executable), ["torch-steps", *timing], env=None, cwd=work)
    ort_steps = _run_child(board.python, ["ort-steps", *timing], env=board.env, cwd=work)
    ort_train = _run_child(
        board.python, ["ort-train", "--work", str(work), "--epochs", str(epochs)], env=board.env, cwd=work
    )
    state, _ = decode_tensors(made.weights)
    expected = get_backend("torch").train(
        program=made.program,
        state=state,
        spec=spec,
        x=x,
        y=y,
        config=TrainConfig(epochs=epochs, batch_size=BATCH, lr=LR, seed=11),
    )
    got = np.load(work / "ort_delta.npz")
    diff = max(float(np.abs(expected.delta[k].astype(np.float64) - got[k]).max()) for k in expected.delta)
    return {
        "family": family,
        "ort_step_ms": round(ort_steps["step_ms"], 4),
        "torch_step_ms": round(torch_steps["step_ms"], 4),
        "ort_peak_rss_mb": round(ort_steps["peak_rss_mb"], 1),
        "torch_peak_rss_mb": round(torch_steps["peak_rss_mb"], 1),
        "param_max_abs_diff": diff,
        "parity_sgd_steps": int(ort_train["steps"]),
    }


# --------------------------------------------------------------------------- mixed round


def run_rounds(*, stack: Any, board: Any, rounds: int, root: Path) -> dict[str, float]:
    """The same digits job on a torch-only group and on a mixed group; each job's final metric."""
    import base64

    from config.demo.nets import bundle, spec_fields
    from config.demo.seed import digits_datasets
    from devices_agent.client import AgentClient
    from devices_agent.data import client_dataset
    from devices_agent.federated import FederatedTrainer, FixedData
    from devices_agent.federated import run_rounds as device_loop
    from fleet.auth import hash_secret, new_secret
    from fleet.models import Device, DeviceGroup
    from models_registry.ort_training import ort_training_build
    from models_registry.services import family_create, version_create
    from models_registry.signing import signing_public_key_b64
    from training import services
    from training.models import FederatedJob, FederatedRound

    root.mkdir(parents=True, exist_ok=True)
    family = family_create(name="bench-digits", **spec_fields("mlp"))
    digits_datasets(family=family)
    made = bundle("mlp")
    version = version_create(family=family, weights=made.weights, onnx=made.onnx, program=made.program)
    ort_training_build(version=version)
    key = signing_public_key_b64()
    parts = [client_dataset(client_index=i, n_clients=3, alpha=0.5, seed=0) for i in range(3)]
    results: dict[str, float] = {}
    stop = threading.Event()
    threads: list[threading.Thread] = []
    children: list[subprocess.Popen[bytes]] = []
    try:
        stack.start_web(workers=1, wait=False)
        stack.start_worker("bench", concurrency=1)
        stack.wait_web(timeout=90)
        for setup in ("torch", "mixed"):
            group = DeviceGroup.objects.create(name=f"bench-{setup}")
            for i, (x, y) in enumerate(parts):
                torchless = setup == "mixed" and i == 2
                secret = new_secret()
                device = Device.objects.create(
                    name=f"{setup}-{i}",
                    secret_hash=hash_secret(secret),
                    status=Device.Status.ONLINE,
                    state={"local_examples": len(x), "training_backends": ["ort" if torchless else "torch"]},
                )
                device.groups.add(group)
                if torchless:
                    data = root / f"{setup}-{i}.npz"
                    np.savez(data, x=x, y=y)
                    children.append(
                        subprocess.Popen(
                            [
                                str(board.python),
                                "-P",
                                str(Path(__file__).resolve()),
                                "--child",
                                "board",
                                *("--server", stack.url, "--secret", secret, "--key", key),
                                *(
                                    "--state",
                                    str(root / f"{setup}-{i}"),
                                    "--data",
                                    str(data),
                                    "--seed",
                                    str(i),
                                ),
                            ],
                            env=board.env,
                            cwd=root,
                        )
                    )
                    continue
                trainer = FederatedTrainer(
                    client=AgentClient(server_url=stack.url, secret=secret),
                    state_dir=root / f"{setup}-{i}",
                    data=FixedData(x, y),
                    public_key=base64.b64decode(key),
                    backends=["torch"],
                    device_seed=i,
                    should_stop=stop.is_set,
                )
                thread = threading.Thread(
                    target=device_loop, args=(trainer,), kwargs={"stop": stop, "wait_s": 2.0}, daemon=True
                )
                thread.start()
                threads.append(thread)
            job = services.job_create(
                actor=None,
                family=family,
                base_version=version,
                target_group=group,
                name=f"bench {setup}",
                rounds=rounds,
                min_clients=3,
                quorum=3,
                local_epochs=2,
                batch_size=BATCH,
                lr=LR,
                round_deadline_s=300,
                seed=0,
            )
            services.job_start(job_id=job.pk, actor=None)
            deadline = time.monotonic() + 120 * rounds + 120
            while FederatedJob.objects.get(pk=job.pk).status not in ("succeeded", "failed"):
                if time.monotonic() > deadline:
                    raise TimeoutError(stack.log("worker")[-3000:])
                time.sleep(0.2)
            last = FederatedRound.objects.filter(job=job, kind="train").order_by("-number").first()
            if last is None or last.metric is None or last.status != "done":
                raise RuntimeError(
                    f"the {setup} job did not finish its rounds: {stack.log('worker')[-3000:]}"
                )
            results[setup] = float(last.metric)
    finally:
        stop.set()
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
        for thread in threads:
            thread.join(timeout=30)
        stack.close()
    return results


@dataclass(frozen=True)
class _Board:
    python: Path
    env: dict[str, str]


def main(argv: list[str] | None = None) -> None:
    args_list = sys.argv[1:] if argv is None else argv
    if args_list[:1] == ["--child"]:
        _child(args_list[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args(args_list)
    from config.board_env import board_environ, board_python, cache_root
    from config.stack import Stack
    from models_registry.ml.ort_env import builder_python

    root = Path(tempfile.mkdtemp(prefix="flotilla-ort-training-"))
    builder = builder_python(cache_root() / "ort-builder", log=print)
    python = board_python(log=print)
    stack = Stack(
        data_dir=root / "stack",
        settings="config.settings.production",
        production_secrets=True,
        log_level="WARNING",
        database_url=f"sqlite:///{root / 'bench.sqlite3'}",
        extra_env={"ORT_BUILDER_PYTHON": str(builder), "ORT_TRAINING_AUTO": "false"},
    )
    stack.migrate()
    stack.setup_django()
    from config.board_env import install_agent

    board = _Board(python=python, env=board_environ(install_agent(python, root / "agent")))
    cases = [run_case(family, builder=builder, board=board, quick=args.quick, root=root) for family in CASES]
    rounds = 2 if args.quick else 5
    finals = run_rounds(stack=stack, board=board, rounds=rounds, root=root / "rounds")
    header = ("family", "ort step ms", "torch step ms", "ort RSS MB", "torch RSS MB", "max |dparam|")
    print("{:10} {:>12} {:>14} {:>11} {:>13} {:>13}".format(*header))
    for case in cases:
        print(
            f"{case['family']:10} {case['ort_step_ms']:12.3f} {case['torch_step_ms']:14.3f} "
            f"{case['ort_peak_rss_mb']:11.0f} {case['torch_peak_rss_mb']:13.0f} "
            f"{case['param_max_abs_diff']:13.2e}"
        )
    print(
        f"digits, {rounds} rounds, 3 boards, central test accuracy: torch only {finals['torch']:.4f}, "
        f"two torch + one ORT board {finals['mixed']:.4f}"
    )
    if args.json:
        print(
            json.dumps(
                {
                    "cases": cases,
                    "mixed_round_final_metric": finals["mixed"],
                    "torch_round_final_metric": finals["torch"],
                    "rounds": rounds,
                    "batch_size": BATCH,
                    "lr": LR,
                    "quick": args.quick,
                }
            )
        )


if __name__ == "__main__":
    main()
