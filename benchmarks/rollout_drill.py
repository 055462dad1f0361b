"""Rollout drill: a simulated fleet on the real stack takes a good version, a bad one, an A/B test.

    python -m benchmarks.rollout_drill [--devices 50] [--quick] [--json]

Setup: a fresh SQLite database and embedded Redis-protocol server; uvicorn, one Celery
worker and Celery beat as real processes (`config.stack`), with short ticks
(`ROLLOUT_TICK_S=1`, `EXPERIMENT_TICK_S=2`) and a 2 s heartbeat interval; the fleet is
`python -m devices_agent simulate` in a subprocess (`--devices` agents, each with its own
Dirichlet share of scikit-learn's digits, 8 labelled inferences per heartbeat, no slow
hardware profile so latency differences come from the models). Three versions of the
digits MLP are registered: v1 trained on 150 examples and v2 on 1,000 (more accurate),
each a full bundle (program, weights, ONNX), and v3, only an ONNX graph: v2's with a
chain of extra 1024x1024 MatMuls whose result is multiplied by zero and added to the
output (same predictions, several milliseconds slower).

0. **baseline**: v1 to every device in one wave with no soak (a plain "update all").
1. **good**: v2 in waves 6% / 20% / 50% / 100% with soaks (the first wave is the three
   devices a gate needs), a latency gate (the median device p95 at most +50% and +5 ms
   over the replaced version's, each device voting once it has 20 samples), rollback on
   failure, one retry per device. All three versions are promoted to production first:
   the drill's group is no canary group. The group's update policy sets a 250 ms health-check
   latency budget, so the slow version passes the agents' health check and it is the
   rollout's metric gate that has to catch it.
2. **bad**: v3 with the same waves and gate: it must be stopped in its first wave and
   rolled back; reported: how many devices ever reported it active.
3. **experiment**: v1 (control) against v2, 50/50, primary metric accuracy on labelled
   feedback, always-valid mSPRT on per-device accuracies (5 devices per arm with 20
   samples each, 200 samples per arm minimum): the winner must be the version with the
   higher held-out test accuracy.

The table reports wall times (staged rollout against the one-wave baseline as a ratio)
and on-device latency medians/p95 of the good and bad versions. With `--json` the last
line is one JSON object with `good_reached_all`, `good_wall_s`, `bad_stopped_in_wave`
(1 = the first wave), `bad_devices_exposed`, `bad_rolled_back`,
`experiment_winner_correct` and the details.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from datetime import timedelta
from typing import Any

import numpy as np

ARCH = "mlp"
MIN_DEVICES = 3  # devices a gate needs before it judges (the default)


class Timeline:
    """Prints timestamped steps and keeps them for the summary."""

    def __init__(self, *, quiet: bool) -> None:
        self.t0 = time.perf_counter()
        self.quiet = quiet
        self.steps: list[tuple[float, str]] = []

    def __call__(self, message: str) -> None:
        t = time.perf_counter() - self.t0
        self.steps.append((t, message))
        if not self.quiet:
            print(f"[{t:7.1f}s] {message}", flush=True)


# --- models -------------------------------------------------------------------------------


def _train(examples: int, seed: int) -> dict[str, np.ndarray]:
    from config.demo.seed import demo_train_weights

    return demo_train_weights(examples=examples, epochs=30, seed=seed)


def _slowed(onnx_bytes: bytes, *, layers: int, width: int = 1024) -> bytes:
    """The same model plus `layers` MatMul+Tanh of width x width, multiplied by zero and
    added to the output: predictions are unchanged, every inference does the extra work."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    x_name = graph.input[0].name
    out_name = graph.output[0].name
    inner = "drill_original_output"
    for node in graph.node:
        node.output[:] = [inner if o == out_name else o for o in node.output]
    rng = np.random.default_rng(0)
    in_dim = int(graph.input[0].type.tensor_type.shape.dim[-1].dim_value or 64)
    graph.initializer.extend(
        [
            numpy_helper.from_array(
                (rng.standard_normal((in_dim, width)) * 0.1).astype(np.float32), "drill_w_in"
            ),
            numpy_helper.from_array(
                (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), "drill_w"
            ),
            numpy_helper.from_array(np.ones((width, 1), dtype=np.float32), "drill_ones"),
            numpy_helper.from_array(np.zeros((1,), dtype=np.float32), "drill_zero"),
        ]
    )
    nodes = [helper.make_node("MatMul", [x_name, "drill_w_in"], ["drill_h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"drill_h{i}", "drill_w"], [f"drill_m{i}"]))
        nodes.append(helper.make_node("Tanh", [f"drill_m{i}"], [f"drill_h{i + 1}"]))
    nodes += [
        helper.make_node("MatMul", [f"drill_h{layers}", "drill_ones"], ["drill_sum"]),
        helper.make_node("Mul", ["drill_sum", "drill_zero"], ["drill_nothing"]),
        helper.make_node("Add", [inner, "drill_nothing"], [out_name]),
    ]
    graph.node.extend(nodes)
    del graph.value_info[:]
    _ = TensorProto  # element types come from the initializers
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _latency_ms(onnx_bytes: bytes, x: np.ndarray, runs: int = 60) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    times = []
    for i in range(runs):
        started = time.perf_counter()
        session.run(None, {name: x[i % len(x) : i % len(x) + 1].astype(np.float32)})
        times.append((time.perf_counter() - started) * 1000)
    return float(np.median(times))


def _accuracy(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    return float((np.argmax(out, axis=1) == y).mean())


def _register_versions(log: Timeline, *, target_extra_ms: float) -> dict[str, Any]:
    """v1 and v2 as any team registers its model: a bundle (program, weights, ONNX) of the
    demo's digits MLP, so boards could also train and personalise them; v3 is only an
    ONNX graph, all a rollout needs."""
    from config.demo.nets import bundle, spec_fields
    from devices_agent.data import load_digits_split
    from models_registry import services

    _, _, x_test, y_test = load_digits_split(seed=0)
    family = services.family_create(name="drill-digits", arch=ARCH, **spec_fields(ARCH))
    out: dict[str, Any] = {}
    exported: dict[str, bytes] = {}
    for key, examples in (("v1", 150), ("v2", 1000)):
        made = bundle(ARCH, _train(examples, seed=0))
        exported[key] = made.onnx
        out[key] = services.version_create(
            family=family,
            weights=made.weights,
            onnx=made.onnx,
            program=made.program,
            head=made.head,
            arch=ARCH,
            notes=f"drill: trained on {examples} examples",
        )
    # Calibrate the slowdown on this machine: enough layers for ~target_extra_ms.
    base = _latency_ms(exported["v2"], x_test)
    probe = _latency_ms(_slowed(exported["v2"], layers=4), x_test)
    per_layer = max((probe - base) / 4, 0.02)
    layers = int(min(400, max(4, np.ceil(target_extra_ms / per_layer))))
    slow = _slowed(exported["v2"], layers=layers)
    out["v3"] = services.version_create(family=family, onnx=slow, notes=f"drill: v2 + {layers} idle MatMuls")
    out["accuracy"] = {k: _accuracy(exported[k], x_test, y_test) for k in ("v1", "v2")}
    out["accuracy"]["v3"] = _accuracy(slow, x_test, y_test)
    out["server_latency_ms"] = {"v2": base, "v3": _latency_ms(slow, x_test)}
    log(
        f"registered v1 (test acc {out['accuracy']['v1']:.3f}), v2 ({out['accuracy']['v2']:.3f}), "
        f"v3 = v2 + {layers} idle layers ({out['server_latency_ms']['v2']:.2f} -> "
        f"{out['server_latency_ms']['v3']:.2f} ms on this CPU)"
    )
    return out


# --- watching -----------------------------------------------------------------------------


def _running_count(version: Any, device_ids: list[Any]) -> int:
    from fleet.models import Device

    return Device.objects.filter(pk__in=device_ids, running_version=version).count()


def _watch_rollout(rollout_id: int, *, devices: list[Any], log: Timeline, timeout: float) -> dict[str, Any]:
    """Poll a rollout until it ends, printing each wave and status change."""
    from fleet.models import Rollout, RolloutDecision

    started = time.perf_counter()
    seen_decisions: set[int] = set()
    rollout = Rollout.objects.get(pk=rollout_id)
    while time.perf_counter() - started < timeout:
        rollout.refresh_from_db()
        for decision in RolloutDecision.objects.filter(rollout_id=rollout_id).exclude(pk__in=seen_decisions):
            seen_decisions.add(decision.pk)
            if decision.action in ("created", "waiting_for_samples"):
                continue
            m = decision.metrics or {}
            numbers = ""
            if "exposed" in m:
                numbers = f" ({m.get('succeeded', 0)}/{m['exposed']} active, {m.get('failed', 0)} failed)"
            gates = m.get("gates") or []
            gate_text = "; ".join(
                f"{g['metric']} {g['value'] if g['value'] is None else round(g['value'], 2)} vs "
                f"{g['baseline_value'] if g['baseline_value'] is None else round(g['baseline_value'], 2)} "
                f"[{g['outcome']}]"
                for g in gates
            )
            log(
                f"  rollout {rollout_id} wave {decision.wave + 1}: {decision.action}{numbers}"
                + (f" gates: {gate_text}" if gate_text else "")
                + (f" - {decision.reason}" if decision.reason and decision.action != "wave_passed" else "")
            )
        if rollout.status not in (Rollout.Status.RUNNING, Rollout.Status.DRAFT):
            break
        time.sleep(0.5)
    wall = time.perf_counter() - started
    return {
        "status": rollout.status,
        "wave": rollout.current_wave,
        "wall_s": wall,
        "reason": rollout.status_reason,
    }


def _wait(predicate: Any, *, timeout: float, every: float = 0.5) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())


def _latency_stats(version: Any, since: Any) -> dict[str, float]:
    from fleet.models import MetricSample

    values = np.asarray(
        MetricSample.objects.filter(version=version, name="latency_ms", ts__gte=since).values_list(
            "value", flat=True
        ),
        dtype=np.float64,
    )
    if values.size == 0:
        return {"n": 0, "p50": float("nan"), "p95": float("nan")}
    return {"n": int(values.size), "p50": float(np.median(values)), "p95": float(np.percentile(values, 95))}


# --- the drill ----------------------------------------------------------------------------


def run(*, devices: int, quick: bool, quiet: bool, keep: bool = False) -> dict[str, Any]:
    from config.stack import Stack

    log = Timeline(quiet=quiet)
    soak = 3.0 if quick else 6.0
    stack = Stack.scratch(
        "flotilla-drill-",
        production=True,
        heartbeat_interval_s=2,
        extra_env={
            "ROLLOUT_TICK_S": "1",
            "EXPERIMENT_TICK_S": "2",
            "HEARTBEAT_CACHE_TTL_S": "1",
            "OFFLINE_AFTER_MISSED": "10",
        },
    )
    work = stack.data_dir
    stack.migrate()
    stack.setup_django()
    import torch

    torch.set_num_threads(1)
    from django.utils import timezone

    from config.demo.seed import promote_to_production
    from fleet.models import Device, DeviceGroup, Experiment, UpdatePolicy
    from fleet.services.enrollment import enrollment_token_create
    from fleet.services.experiments import experiment_create, experiment_start
    from fleet.services.rollouts import rollout_create, rollout_start

    log(f"database {(stack.database_url or '').split('/')[-1]}, broker {stack.redis_url}, {devices} devices")
    models = _register_versions(log, target_extra_ms=8.0)
    # The drill's group is no canary group: what it is given must be in production.
    for key in ("v1", "v2", "v3"):
        models[key] = promote_to_production(version=models[key])
    v1, v2, v3 = models["v1"], models["v2"], models["v3"]
    # The agents' health check times inference on cores shared with 50 simulated boards,
    # the server and the worker; a roomy budget keeps the drill about the metric gate.
    policy = UpdatePolicy.objects.create(name="drill", health_latency_budget_ms=250.0)
    group = DeviceGroup.objects.create(name="drill", tag_selector=["simulated"], policy=policy)
    _, token = enrollment_token_create(
        actor=None,
        name="drill",
        max_uses=devices,
        expires_at=timezone.now() + timedelta(hours=2),
        device_tags_allowed=["simulated", "profile-*"],
    )

    result: dict[str, Any] = {"devices": devices, "quick": quick, "soak_s": soak}
    try:
        stack.start_web(workers=1, wait=False)
        stack.start_worker("drill", concurrency=2)
        stack.start_beat()
        stack.wait_web(timeout=60)
        log("web, worker and beat up")
        stack.start(
            "fleet",
            [
                sys.executable, "-m", "devices_agent", "simulate",
                "--devices", str(devices), "--server", stack.url, "--token", token,
                "--state-root", str(work / "fleet"), "--interval", "2", "--slow-fraction", "0",
                "--threads", "6", "--inferences", "8", "--no-train",
            ],
        )  # fmt: skip
        enrolled = _wait(lambda: Device.objects.filter(status="online").count() >= devices, timeout=120)
        ids = list(Device.objects.values_list("pk", flat=True))
        log(f"{len(ids)} devices enrolled and online" + ("" if enrolled else " (timed out waiting for all)"))

        # 0. baseline: everyone to v1 in one wave, no soak.
        started = time.perf_counter()
        base = rollout_create(
            actor=None,
            data={"version": v1.pk, "target_group": group.pk, "waves": [{"percent": 100, "soak_s": 0}]},
        )
        rollout_start(rollout_id=base.pk, actor=None)
        _watch_rollout(base.pk, devices=ids, log=log, timeout=180)
        _wait(lambda: _running_count(v1, ids) == len(ids), timeout=60)
        result["baseline_wall_s"] = time.perf_counter() - started
        log(
            f"baseline: v1 on {_running_count(v1, ids)}/{len(ids)} devices "
            f"in {result['baseline_wall_s']:.1f}s"
        )

        # Gates count devices: the first wave holds the three a gate needs to judge.
        first = max(2.0, float(np.ceil(100.0 * MIN_DEVICES / devices)))
        waves: list[dict[str, float]] = [
            {"percent": first, "soak_s": soak},
            {"percent": max(first, 20.0), "soak_s": soak},
            {"percent": 50, "soak_s": soak},
            {"percent": 100, "soak_s": 0},
        ]
        gates = [
            {
                "metric": "latency_p95_ms",
                "max_increase_pct": 50,
                "abs_tolerance": 5.0,
                "min_samples": 20,
                "min_devices": MIN_DEVICES,
            }
        ]

        # 1. the good version.
        log("scenario 1: good version v2 in waves " + "/".join(f"{w['percent']:g}" for w in waves) + "%")
        good_since = timezone.now()
        started = time.perf_counter()
        good = rollout_create(
            actor=None,
            data={
                "version": v2.pk,
                "target_group": group.pk,
                "waves": waves,
                "gates": gates,
                "on_gate_failure": "rollback",
                "in_progress_timeout_s": 120,
                "max_retries": 1,
                "retry_backoff_s": 2,
            },
        )
        rollout_start(rollout_id=good.pk, actor=None)
        outcome = _watch_rollout(good.pk, devices=ids, log=log, timeout=300)
        _wait(lambda: _running_count(v2, ids) == len(ids), timeout=30)
        result["good_wall_s"] = time.perf_counter() - started
        result["good_status"] = outcome["status"]
        result["good_devices_on_version"] = _running_count(v2, ids)
        result["good_reached_all"] = outcome["status"] == "succeeded" and result[
            "good_devices_on_version"
        ] == len(ids)
        log(
            f"good: {outcome['status']}, v2 on {result['good_devices_on_version']}/{len(ids)} "
            f"in {result['good_wall_s']:.1f}s"
        )

        # 2. the bad version.
        log("scenario 2: slow version v3 in the same waves")
        from fleet.models import DeploymentEvent, RolloutDecision

        bad_since = timezone.now()
        bad = rollout_create(
            actor=None,
            data={
                "version": v3.pk,
                "target_group": group.pk,
                "waves": waves,
                "gates": gates,
                "on_gate_failure": "rollback",
                "in_progress_timeout_s": 120,
                "max_retries": 1,
                "retry_backoff_s": 2,
            },
        )
        rollout_start(rollout_id=bad.pk, actor=None)
        outcome = _watch_rollout(bad.pk, devices=ids, log=log, timeout=240)
        exposed = (
            DeploymentEvent.objects.filter(deployment__version=v3, state="active")
            .values("deployment__device").distinct().count()
        )  # fmt: skip
        back = _wait(lambda: _running_count(v3, ids) == 0 and _running_count(v2, ids) == len(ids), timeout=60)
        result["bad_status"] = outcome["status"]
        result["bad_stopped_in_wave"] = (
            outcome["wave"] + 1 if outcome["status"] in ("rolled_back", "paused") else None
        )
        result["bad_devices_exposed"] = exposed
        result["bad_rolled_back"] = outcome["status"] == "rolled_back" and back
        result["bad_reason"] = outcome["reason"]
        decision = RolloutDecision.objects.filter(rollout=bad, action="rolled_back").first()
        result["bad_gate"] = (decision.metrics.get("gates") if decision else None) or []
        result["latency_good"] = _latency_stats(v2, good_since)
        result["latency_bad"] = _latency_stats(v3, bad_since)
        log(
            f"bad: {outcome['status']} in wave {result['bad_stopped_in_wave']}, "
            f"{exposed} device(s) ever ran it, all back on v2: {back}"
        )

        # 3. the experiment.
        log("scenario 3: A/B experiment v1 (control) vs v2 on accuracy")
        experiment = experiment_create(
            actor=None,
            data={
                "name": "drill v1 vs v2",
                "target_group": group.pk,
                "arms": [
                    {"name": "v1", "version_id": v1.pk, "share": 0.5},
                    {"name": "v2", "version_id": v2.pk, "share": 0.5},
                ],
                "primary_metric": "accuracy",
                "guardrails": [{"metric": "error_rate", "max": 0.2, "min_samples": 50}],
                "min_samples_per_arm": 200,
                "effect_scale": 0.05,
            },
        )
        started = time.perf_counter()
        experiment_start(experiment_id=experiment.pk, actor=None)
        _wait(lambda: Experiment.objects.get(pk=experiment.pk).status != "running", timeout=240, every=1.0)
        experiment.refresh_from_db()
        result["experiment_wall_s"] = time.perf_counter() - started
        winner = (experiment.result or {}).get("winner")
        better = "v2" if models["accuracy"]["v2"] > models["accuracy"]["v1"] else "v1"
        result["experiment_status"] = experiment.status
        result["experiment_winner"] = winner["name"] if winner else None
        result["experiment_expected"] = better
        result["experiment_winner_correct"] = bool(winner and winner["name"] == better)
        result["experiment_result"] = winner
        log(f"experiment: {experiment.status}; " + (winner["summary"] if winner else "no winner"))
    finally:
        # The simulated fleet first, while the server still answers its last requests.
        stack.stop("fleet", timeout=30)
        stack.close()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    result["test_accuracy"] = models["accuracy"]
    result["server_latency_ms"] = models["server_latency_ms"]
    result["timeline"] = [[round(t, 2), m] for t, m in log.steps]
    result["work_dir"] = str(work) if keep else None
    return result


def _table(r: dict[str, Any]) -> str:
    lg, lb = r.get("latency_good", {}), r.get("latency_bad", {})
    ratio = r["good_wall_s"] / r["baseline_wall_s"] if r.get("baseline_wall_s") else float("nan")
    lat_ratio = lb.get("p95", float("nan")) / lg.get("p95", float("nan")) if lg.get("p95") else float("nan")
    rows = [
        ("baseline: v1 to all, one wave (s)", f"{r.get('baseline_wall_s', float('nan')):.1f}"),
        ("good v2: 4 waves with soaks (s)", f"{r.get('good_wall_s', float('nan')):.1f}"),
        ("  ratio staged / one wave", f"{ratio:.2f}"),
        ("  reached every device", str(r.get("good_reached_all"))),
        (
            "on-device latency v2 p50 / p95 (ms)",
            f"{lg.get('p50', float('nan')):.2f} / {lg.get('p95', float('nan')):.2f}  (n={lg.get('n', 0)})",
        ),
        (
            "on-device latency v3 p50 / p95 (ms)",
            f"{lb.get('p50', float('nan')):.2f} / {lb.get('p95', float('nan')):.2f}  (n={lb.get('n', 0)})",
        ),
        ("  p95 ratio bad / good", f"{lat_ratio:.2f}"),
        ("bad v3: stopped in wave", str(r.get("bad_stopped_in_wave"))),
        ("  devices that ever ran it", f"{r.get('bad_devices_exposed')} of {r['devices']}"),
        ("  rolled back", str(r.get("bad_rolled_back"))),
        ("experiment winner / expected", f"{r.get('experiment_winner')} / {r.get('experiment_expected')}"),
        ("  wall (s)", f"{r.get('experiment_wall_s', float('nan')):.1f}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="shorter soaks")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    args = parser.parse_args(argv)
    result = run(devices=args.devices, quick=args.quick, quiet=False, keep=args.keep)
    print()
    print(_table(result))
    if result.get("experiment_result"):
        print(result["experiment_result"]["summary"])
    if args.json:
        keys = [
            "good_reached_all", "good_wall_s", "bad_stopped_in_wave", "bad_devices_exposed",
            "bad_rolled_back", "experiment_winner_correct",
        ]  # fmt: skip
        summary = {k: result.get(k) for k in keys}
        summary.update({k: v for k, v in result.items() if k not in summary and k != "timeline"})
        print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
