"""Streaming FedAvg over update files on disk versus a plain in-memory numpy average.

    python -m benchmarks.aggregation [--quick] [--json] [--repeats N]

For each (devices, parameters) case every device's delta is written as a safetensors
file in a temporary directory (plain files standing in for artifact storage). The
streaming ``WeightedMeanAggregator`` then reads them back one at a time
(``UpdateFileReader``: each file's tensor bytes read with one ``preadv`` into a
buffer reused for every file) and accepts each with its example-count weight. The baseline, measured in the
same run, is the straightforward numpy loop ``acc[k] += w * u[k]`` (float64 sums)
over the same arrays already in memory, so it pays for no I/O at all; it does allocate
a temporary for ``w * u[k]`` per tensor, which costs it page faults on large tensors.

* ``gbps`` / ``baseline_gbps``: float32 bytes of all updates / wall time (median of
  ``runs`` runs each, alternated in one process; ``runs`` is ``--repeats``, tripled for
  cases under 200 MB of input, which last milliseconds), including the final division.
  The files were just written, so reads come from the page cache: this measures the
  I/O path (reads out of the page cache, header parsing), not the physical disk.
* ``extra_peak_mb``: RSS high-water mark minus RSS before aggregating, measured in a
  fresh subprocess during its first streaming run, before the baseline's arrays are
  loaded (``VmHWM`` after a reset); it includes the reader's buffer, the float64
  sums and the float32 result.
* ``limit_mb`` = 3 x model + 50 MB, the budget whatever the number of devices.
* ``max_abs_diff``: largest difference between the two results (a correctness check;
  both form ``w * u`` in float32 and sum in float64, so it is normally 0).

With ``--json`` the last line is one JSON object ``{"cases": [...]}``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from training.aggregation import UpdateFileReader, WeightedMeanAggregator

FULL_CASES = [(100, 100_000), (1000, 100_000), (100, 1_000_000), (10, 10_000_000)]
QUICK_CASES = [(50, 100_000), (200, 100_000), (20, 1_000_000), (4, 4_000_000)]
MB = 1024 * 1024
_STEADY_BYTES = 200_000_000


def layout(params: int) -> dict[str, tuple[int, ...]]:
    """A three-tensor model of exactly ``params`` float32 parameters."""
    bias = min(1000, params // 10)
    rest = params - bias
    first = (rest * 3 // 4) // 100 * 100
    second = rest - first
    shapes: dict[str, tuple[int, ...]] = {"layer1.weight": (first // 100, 100)}
    shapes["layer2.weight"] = (second // 100, 100) if second % 100 == 0 else (second,)
    shapes["layer2.bias"] = (bias,)
    return shapes


def make_case(directory: Path, devices: int, params: int, seed: int) -> None:
    """Write global weights, one update file per device and the example-count weights."""
    shapes = layout(params)
    rng = np.random.default_rng(seed)
    global_weights = {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}
    save_file(global_weights, str(directory / "global.safetensors"))
    for i in range(devices):
        update = {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.01) for k, s in shapes.items()}
        save_file(update, str(directory / f"update-{i:05d}.safetensors"))
    # Example counts as the weights, as FedAvg uses them; Python floats, so the
    # baseline's `w * u` stays float32 (the fast way to write it in numpy).
    weights = [float(w) for w in rng.integers(10, 500, size=devices)]
    (directory / "weights.json").write_text(json.dumps(weights))


def baseline_average(
    global_weights: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]], weights: list[float]
) -> dict[str, np.ndarray]:
    """Plain numpy streaming weighted average of arrays already in memory."""
    acc = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_weights.items()}
    total = 0.0
    for update, w in zip(updates, weights, strict=True):
        for k in acc:
            acc[k] += w * update[k]
        total += w
    return {k: (global_weights[k] + acc[k] / total).astype(np.float32) for k in acc}


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux)."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> None:
    """Reset the RSS high-water mark (Linux >= 4.0); harmless where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def streaming_average(
    global_weights: dict[str, np.ndarray], paths: list[Path], weights: list[float]
) -> dict[str, np.ndarray]:
    """The system under test: stream update files from disk through the aggregator."""
    agg = WeightedMeanAggregator(global_weights=global_weights)
    reader = UpdateFileReader()
    for i, (path, w) in enumerate(zip(paths, weights, strict=True)):
        agg.accept(reader.read(path), weight=w, update_id=f"device-{i}")
    return agg.finalize()


def worker(directory: Path, repeats: int) -> None:
    """Measure one case in a fresh process and print its numbers as JSON.

    The first streaming run happens before anything else is allocated and gives the
    memory figure. Then every update is loaded into memory for the baseline, and the
    remaining runs alternate baseline / streaming so that load from other processes on
    the machine hits both sides alike.
    """
    global_weights = load_file(str(directory / "global.safetensors"))
    weights = json.loads((directory / "weights.json").read_text())
    paths = sorted(directory.glob("update-*.safetensors"))

    # VmHWM after a reset, not ru_maxrss: ru_maxrss survives fork+exec and would
    # report the parent's memory.
    reset_peak_rss()
    before = rss_mb()
    start = time.perf_counter()
    result = streaming_average(global_weights, paths, weights)
    stream_times = [time.perf_counter() - start]
    extra_peak_mb = _status_mb("VmHWM") - before

    updates = [load_file(str(path)) for path in paths]
    base_times: list[float] = []
    reference: dict[str, np.ndarray] = {}
    for rep in range(2 * repeats - 1):
        start = time.perf_counter()
        if rep % 2 == 0:
            reference = baseline_average(global_weights, updates, weights)
            base_times.append(time.perf_counter() - start)
        else:
            result = streaming_average(global_weights, paths, weights)
            stream_times.append(time.perf_counter() - start)
    diff = max(float(np.abs(result[k] - reference[k]).max()) for k in reference)
    print(
        json.dumps(
            {
                "stream_times": stream_times,
                "base_times": base_times,
                "extra_peak_mb": extra_peak_mb,
                "max_abs_diff": diff,
            }
        )
    )


def run_case(devices: int, params: int, repeats: int, seed: int) -> dict[str, float]:
    """Measure one (devices, params) case in a subprocess; files are deleted afterwards."""
    input_bytes = devices * params * 4
    # Small cases take milliseconds per run: more runs keep their median steady.
    runs = repeats if input_bytes >= _STEADY_BYTES else 3 * repeats
    directory = Path(tempfile.mkdtemp(prefix="flotilla-agg-bench-"))
    try:
        make_case(directory, devices, params, seed)
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.aggregation",
                "--worker",
                str(directory),
                "--repeats",
                str(runs),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    gbps = input_bytes / statistics.median(measured["stream_times"]) / 1e9
    baseline_gbps = input_bytes / statistics.median(measured["base_times"]) / 1e9
    model_mb = params * 4 / MB
    return {
        "devices": devices,
        "params": params,
        "runs": runs,
        "gbps": round(gbps, 3),
        "baseline_gbps": round(baseline_gbps, 3),
        "ratio": round(gbps / baseline_gbps, 3),
        "extra_peak_mb": round(float(measured["extra_peak_mb"]), 1),
        "model_mb": round(model_mb, 1),
        "limit_mb": round(3 * model_mb + 50, 1),
        "max_abs_diff": float(f"{measured['max_abs_diff']:.3g}"),
    }


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller cases")
    parser.add_argument("--json", action="store_true", help="print a JSON object last")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case (median); x3 for small cases")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, args.repeats)
        return

    cases = QUICK_CASES if args.quick else FULL_CASES
    columns = [
        "devices",
        "params",
        "runs",
        "gbps",
        "baseline_gbps",
        "ratio",
        "extra_peak_mb",
        "model_mb",
        "limit_mb",
        "max_abs_diff",
    ]
    print("Streaming FedAvg from safetensors files vs in-memory numpy baseline")
    print(
        "median of `runs` runs per side; extra_peak_mb = RSS high-water mark minus RSS before "
        "aggregating, in a fresh subprocess"
    )
    print(" ".join(f"{c:>13}" for c in columns))
    rows = []
    for i, (devices, params) in enumerate(cases):
        row = run_case(devices, params, args.repeats, seed=i)
        rows.append(row)
        print(" ".join(f"{row[c]:>13}" for c in columns), flush=True)
    ok_ratio = all(r["ratio"] >= 0.5 for r in rows)
    ok_memory = all(r["extra_peak_mb"] <= r["limit_mb"] for r in rows)
    print(
        f"goals: ratio >= 0.5: {'met' if ok_ratio else 'MISSED'}; "
        f"extra memory <= 3 x model + 50 MB: {'met' if ok_memory else 'MISSED'}"
    )
    if args.json:
        keys = ["devices", "params", "gbps", "baseline_gbps", "ratio", "extra_peak_mb"]
        print(json.dumps({"cases": [{k: r[k] for k in keys} for r in rows]}))


if __name__ == "__main__":
    main()
