"""The agent's footprint: resident memory, inference latency, heartbeat traffic.

    python -m benchmarks.agent [--quick] [--json]

What it does, in one run on this machine:

1. starts the server stack (uvicorn with the production settings, SQLite or
   ``DATABASE_URL``, embedded Redis) and registers a digits MLP version (a bundle:
   program, weights, ONNX);
2. starts the agent in a **separate process** (``python -m benchmarks.agent --child``),
   which enrolls, heartbeats a few times and reports its resident memory (RSS) with no
   model loaded, and whether ``torch`` is in ``sys.modules`` (it must not be);
3. assigns the version to the device; the agent downloads, verifies, health-checks and
   activates it and opens its local API socket; this process then plays the application
   beside it: predictions on the digits test split through the socket
   (``devices_agent.local_client.AgentClient``), each followed by its right answer
   (``feedback``); the agent reports its RSS again. Personalisation is off in this agent
   (fine-tuning a head is what loads torch on a board, and ``benchmarks.board_learning``
   measures a learning board): this is the footprint of serving;
4. measures the heartbeat's bytes on the wire: request line, headers and body both ways,
   of real heartbeats to the real server (TCP/IP overhead excluded), times the number of
   heartbeats a day at the default 60 s interval; and, separately, a full heartbeat cycle
   (heartbeat plus the metrics batch it flushes);
5. in this process, times single-sample and batch-64 inference in ONNX Runtime (one
   intra-op thread, as on a board) next to torch eager (one thread) on the same weights,
   and a single prediction through the agent's local API next to them.

Baselines in the same run: a bare ``python -c "import numpy"`` process for RSS, torch
eager for latency. Medians over many runs; ratios printed.

With ``--json`` the last line is one JSON object with ``idle_rss_mb``, ``serving_rss_mb``,
``ort_batch1_us``, ``torch_batch1_us``, ``local_api_predict_us``,
``heartbeat_bytes_per_day`` and more.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GOAL_IDLE_RSS_MB = 64.0
GOAL_BYTES_PER_DAY = 1_000_000
DEFAULT_INTERVAL_S = 60


def _rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss / 1e6)


def _child(args: argparse.Namespace) -> None:
    """The measured agent process: prints one JSON line per phase on stdout."""
    import random

    from devices_agent.agent import Agent
    from devices_agent.client import WireCounter
    from devices_agent.config import AgentConfig

    config = AgentConfig(
        server_url=args.server,
        allow_insecure_http=args.server.startswith("http://"),  # the benchmark's own local stack
        state_dir=Path(args.state_dir),
        enrollment_token=args.token,
        name="bench-agent",
        websocket=False,
        health_check_runs=10,
        personalise=False,
        local_api_socket=str(Path(args.state_dir) / "agent.sock"),
    )
    agent = Agent(config=config, rng=random.Random(0))
    agent.enroll()
    for _ in range(3):
        agent.step()
    assert agent.client is not None

    # Pure heartbeats, counted on the wire.
    counter = WireCounter()
    agent.client.counter = counter
    beats = 10 if args.quick else 30
    for _ in range(beats):
        # Through the agent, so it leaves out what an earlier heartbeat already said.
        agent.heartbeat()
    heartbeat_bytes = (counter.sent + counter.received) / counter.requests
    heartbeat_sent = counter.sent / counter.requests
    heartbeat_body = counter.received_body / counter.requests
    # Full cycles: heartbeat + reconcile + the metrics batch of resource samples.
    cycle = WireCounter()
    agent.client.counter = cycle
    cycles = 10 if args.quick else 20
    for _ in range(cycles):
        agent.step()
    agent.client.counter = None
    gc.collect()
    idle = {
        "phase": "idle",
        "device_id": agent.device_id,
        "rss_mb": _rss_mb(),
        "torch_loaded": "torch" in sys.modules,
        "heartbeat_bytes": heartbeat_bytes,
        "heartbeat_sent_bytes": heartbeat_sent,
        "heartbeat_response_body_bytes": heartbeat_body,
        "cycle_bytes": (cycle.sent + cycle.received) / cycles,
        "cycle_requests": cycle.requests / cycles,
    }
    print(json.dumps(idle), flush=True)

    sys.stdin.readline()  # the parent assigned a version
    for _ in range(10):
        outcome = agent.step().outcome
        if outcome is not None and outcome.action in ("active", "current"):
            break
    assert agent.runtime.active() is not None, "the model did not become active"
    server = agent.start_local_api()
    assert server is not None and server.socket_path is not None
    print(json.dumps({"phase": "ready", "socket": str(server.socket_path)}), flush=True)

    sys.stdin.readline()  # the application beside the agent is done
    agent.flush_metrics()
    gc.collect()
    serving = {
        "phase": "serving",
        "rss_mb": _rss_mb(),
        "torch_loaded": "torch" in sys.modules,
        "examples": agent.samples.counts().examples,
    }
    print(json.dumps(serving), flush=True)
    agent.close()


def _application(socket_path: str, *, n: int) -> list[float]:
    """The application beside the agent: predictions with feedback over the local API.

    Returns the wall time of each ``predict`` call in microseconds.
    """
    from devices_agent.data import load_digits_split
    from devices_agent.local_client import AgentClient

    _, _, x_test, y_test = load_digits_split(seed=0)
    times = []
    with AgentClient(socket_path) as client:
        for i in range(n):
            x = x_test[i % len(x_test)]
            started = time.perf_counter_ns()
            answer = client.predict(x)
            times.append((time.perf_counter_ns() - started) / 1000.0)
            client.feedback(answer["prediction_id"], int(y_test[i % len(y_test)]))
    return times


def _bare_python_rss() -> float:
    out = subprocess.run(
        [sys.executable, "-c", "import numpy, psutil; print(psutil.Process().memory_info().rss / 1e6)"],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(out.stdout.strip())


def _time_us(fn: Any, *, repeat: int) -> float:
    for _ in range(max(5, repeat // 20)):
        fn()
    times = []
    for _ in range(repeat):
        started = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - started) / 1000.0)
    return float(statistics.median(times))


def _latencies(onnx_bytes: bytes, module: Any, *, quick: bool) -> dict[str, float]:
    import numpy as np
    import torch

    from devices_agent.data import load_digits_split
    from devices_agent.inference import load_session

    torch.set_num_threads(1)
    _, _, x_test, _ = load_digits_split(seed=0)
    one = np.ascontiguousarray(x_test[:1])
    batch = np.ascontiguousarray(np.resize(x_test, (64, x_test.shape[1])))
    session = load_session(onnx_bytes, threads=1)
    name = session.get_inputs()[0].name
    module.eval()
    t_one, t_batch = torch.from_numpy(one), torch.from_numpy(batch)
    repeat = 300 if quick else 2000
    with torch.no_grad():
        result = {
            "ort_batch1_us": _time_us(lambda: session.run(None, {name: one}), repeat=repeat),
            "torch_batch1_us": _time_us(lambda: module(t_one), repeat=repeat),
            "ort_batch64_us": _time_us(lambda: session.run(None, {name: batch}), repeat=repeat),
            "torch_batch64_us": _time_us(lambda: module(t_batch), repeat=repeat),
        }
        # Same answers, or the comparison means nothing.
        ort_out = session.run(None, {name: batch})[0]
        torch_out = module(t_batch).numpy()
    result["max_abs_diff"] = float(np.max(np.abs(ort_out - torch_out)))
    return result


def run(*, quick: bool) -> dict[str, Any]:
    from config.stack import Stack

    with Stack.scratch("flotilla-agent-bench-", production=True, heartbeat_interval_s=60) as stack:
        stack.migrate()
        stack.setup_django()
        stack.start_web(workers=1, timeout=90)
        from config.demo.seed import digits_version, enrollment_token, promote_to_production

        token = enrollment_token(max_uses=1)
        version, module = digits_version(seed=0)
        version = promote_to_production(version=version)  # what a device outside a canary group takes
        onnx_bytes = version.artifacts.get(kind="onnx").file.read()
        state_dir = Path(tempfile.mkdtemp(prefix="flotilla-agent-state-"))
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.agent",
                "--child",
                "--server",
                stack.url,
                "--token",
                token,
                "--state-dir",
                str(state_dir),
                *(["--quick"] if quick else []),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        try:
            idle = json.loads(child.stdout.readline())
            from fleet.services.devices import device_assign_version

            device_assign_version(actor=None, device_id=idle["device_id"], version_id=version.pk)
            child.stdin.write("go\n")
            child.stdin.flush()
            ready = json.loads(child.stdout.readline())
            predictions = 500 if quick else 2000
            api_times = _application(ready["socket"], n=predictions)
            child.stdin.write("done\n")
            child.stdin.flush()
            serving = json.loads(child.stdout.readline())
            child.wait(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
        bare_rss = _bare_python_rss()
        latencies = _latencies(onnx_bytes, module, quick=quick)
        database = stack.database
    per_day = DEFAULT_INTERVAL_S and 86400 // DEFAULT_INTERVAL_S
    return {
        "idle_rss_mb": round(idle["rss_mb"], 1),
        "serving_rss_mb": round(serving["rss_mb"], 1),
        "bare_python_rss_mb": round(bare_rss, 1),
        "torch_loaded_idle": idle["torch_loaded"],
        "torch_loaded_serving": serving["torch_loaded"],
        "predictions": predictions,
        "examples_kept": serving["examples"],
        # The first calls open the connection and warm the agent's caches.
        "local_api_predict_us": round(float(statistics.median(api_times[20:])), 2),
        "heartbeat_bytes": round(idle["heartbeat_bytes"], 1),
        "heartbeat_sent_bytes": round(idle["heartbeat_sent_bytes"], 1),
        "heartbeat_response_body_bytes": round(idle["heartbeat_response_body_bytes"], 1),
        "heartbeat_bytes_per_day": int(idle["heartbeat_bytes"] * per_day),
        "cycle_bytes": round(idle["cycle_bytes"], 1),
        "cycle_requests": idle["cycle_requests"],
        "cycle_bytes_per_day": int(idle["cycle_bytes"] * per_day),
        **{k: round(v, 2) if k.endswith("_us") else v for k, v in latencies.items()},
        "database": database,
        "quick": quick,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer heartbeats, predictions and timing runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args)
        return
    r = run(quick=args.quick)
    print(
        f"agent benchmark ({'quick' if args.quick else 'full'}), "
        f"database={r['database']}, one intra-op thread"
    )
    print()
    header = f"{'memory (separate process)':<44}{'RSS MB':>10}{'goal':>10}"
    print(header)
    print("-" * len(header))
    print(f"{'bare python + numpy (baseline)':<44}{r['bare_python_rss_mb']:>10.1f}{'':>10}")
    print(f"{'agent idle (enrolled, heartbeating)':<44}{r['idle_rss_mb']:>10.1f}{'<= 64':>10}")
    print(f"{'agent serving inference':<44}{r['serving_rss_mb']:>10.1f}{'':>10}")
    print(f"torch in sys.modules: idle={r['torch_loaded_idle']} serving={r['torch_loaded_serving']}")
    print(f"idle / bare python: {r['idle_rss_mb'] / r['bare_python_rss_mb']:.2f}x")
    print()
    header = f"{'inference (median)':<30}{'batch 1 us':>12}{'batch 64 us':>13}"
    print(header)
    print("-" * len(header))
    print(f"{'torch eager (baseline)':<30}{r['torch_batch1_us']:>12.1f}{r['torch_batch64_us']:>13.1f}")
    print(f"{'onnxruntime':<30}{r['ort_batch1_us']:>12.1f}{r['ort_batch64_us']:>13.1f}")
    print(
        f"{'speed-up torch/ort':<30}{r['torch_batch1_us'] / r['ort_batch1_us']:>11.2f}x"
        f"{r['torch_batch64_us'] / r['ort_batch64_us']:>12.2f}x"
    )
    print(
        f"{'agent local API predict (UDS)':<30}{r['local_api_predict_us']:>12.1f}"
        f"{'':>13}   {r['local_api_predict_us'] / r['ort_batch1_us']:.2f}x onnxruntime"
    )
    print(f"max |ort - torch| on the batch: {r['max_abs_diff']:.2e}")
    print(
        f"{r['predictions']} predictions with feedback through the local API; "
        f"the agent kept {r['examples_kept']} labelled examples"
    )
    print()
    header = f"{'traffic at the 60 s default interval':<44}{'bytes':>10}{'per day':>12}{'goal':>10}"
    print(header)
    print("-" * len(header))
    print(
        f"{'heartbeat (request + response)':<44}{r['heartbeat_bytes']:>10.0f}"
        f"{r['heartbeat_bytes_per_day']:>12,}{'< 1 MB':>10}"
    )
    print(f"{'  of which sent by the agent':<44}{r['heartbeat_sent_bytes']:>10.0f}")
    received = r["heartbeat_bytes"] - r["heartbeat_sent_bytes"]
    print(f"{'  received: response headers':<44}{received - r['heartbeat_response_body_bytes']:>10.0f}")
    print(f"{'  received: response body':<44}{r['heartbeat_response_body_bytes']:>10.0f}")
    print(
        f"{'full cycle, avg ' + format(r['cycle_requests'], 'g') + ' requests (+ metrics)':<44}"
        f"{r['cycle_bytes']:>10.0f}{r['cycle_bytes_per_day']:>12,}"
    )
    if args.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
