"""On-device inference over the active ONNX model, its metrics, and the health check.

Sessions run with one intra-op thread (boards are small and share their cores with the
rest of the agent); predictions are served by the local API (:mod:`devices_agent.local_api`).

:func:`health_check` is what the updater runs before a new model may stay active: load
it, run a deterministic input of the family's input shape, check the output's shape and
finiteness, and compare the p95 latency of a few runs with the policy's budget.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "HealthResult",
    "health_check",
    "load_session",
    "resource_usage",
    "to_probabilities",
]


def load_session(
    model: Path | bytes, *, threads: int = 1, initializers: Mapping[str, npt.ArrayLike] | None = None
) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads, run sequentially.

    ``initializers`` replace the graph's initializers of the same names (a board's personal
    head on the global graph, new weights for a round) without rewriting the file.
    onnxruntime is imported here rather than at module level: an agent with no model
    yet (or only heartbeating) stays some 20 MB smaller.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    values = []
    for name, array in (initializers or {}).items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        options.add_initializer(name, value)
        values.append(value)
    source: str | bytes = str(model) if isinstance(model, Path) else model
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    # The session reads the overriding values in place: they must live as long as it does.
    session._flotilla_initializers = values
    return session


def to_probabilities(outputs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Rows of class probabilities: the outputs themselves if they already are, else softmax."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.min() >= 0.0 and np.allclose(out.sum(axis=-1), 1.0, atol=1e-3):
        probs: npt.NDArray[np.float32] = out.astype(np.float32)
        return probs
    # Subtracting the row maximum keeps exp() from overflowing on large logits.
    shifted = np.exp(out - out.max(axis=-1, keepdims=True))
    soft: npt.NDArray[np.float32] = (shifted / shifted.sum(axis=-1, keepdims=True)).astype(np.float32)
    return soft


def input_shape_of(session: Any) -> list[int] | None:
    """The per-example input shape the model declares, when every dimension is fixed."""
    dims = session.get_inputs()[0].shape[1:]
    if all(isinstance(d, int) and d > 0 for d in dims):
        return [int(d) for d in dims]
    return None


@functools.cache
def _this_process() -> Any:
    import psutil

    # One Process object for the agent's life: cpu_percent() measures since the previous
    # call on the same object, and a fresh object would always say 0.0.
    return psutil.Process()


def resource_usage() -> dict[str, float]:
    """This process's CPU percent (since the last call) and resident memory in MB."""
    process = _this_process()
    return {
        "cpu_percent": float(process.cpu_percent(interval=None)),
        "ram_mb": process.memory_info().rss / 1e6,
    }


@dataclass(frozen=True)
class HealthResult:
    """The outcome of a health check; ``reason`` says why it failed."""

    ok: bool
    reason: str
    p95_ms: float | None
    runs: int
    session: Any = None  # the loaded session, reusable when ok

    def detail(self) -> dict[str, Any]:
        """JSON-ready numbers for the deployment report."""
        return {"p95_ms": self.p95_ms, "runs": self.runs, "reason": self.reason}


def health_check(
    *,
    model: Path | bytes,
    input_shape: list[int] | None = None,
    num_classes: int | None = None,
    latency_budget_ms: float | None = None,
    runs: int = 20,
    extra_delay_ms: float = 0.0,
    input_dtype: str = "float32",
) -> HealthResult:
    """Load ``model``, run a deterministic input, check outputs and the p95 latency budget.

    The input is a fixed pseudo-random batch of one (seed 0) of ``input_shape`` (read off
    the model when not given; integers for an integer ``input_dtype``). Fails when the
    model does not load, the output is not ``(1, num_classes)`` (the family's outputs per
    example), holds non-finite values, or the p95 latency of ``runs`` runs
    (after one warm-up) exceeds ``latency_budget_ms``.
    """
    try:
        session = load_session(model)
    except Exception as exc:
        return HealthResult(ok=False, reason=f"model does not load: {exc}", p95_ms=None, runs=0)
    shape = input_shape or input_shape_of(session)
    if not shape:
        return HealthResult(
            ok=False, reason="input shape unknown and not fixed in the model", p95_ms=None, runs=0
        )
    rng = np.random.default_rng(0)
    if input_dtype == "float32":
        x: npt.NDArray[Any] = rng.random((1, *shape), dtype=np.float32)
    else:
        x = rng.integers(0, 8, size=(1, *shape)).astype(np.dtype(input_dtype))
    name = session.get_inputs()[0].name
    try:
        first = np.asarray(session.run(None, {name: x})[0])
    except Exception as exc:
        return HealthResult(ok=False, reason=f"smoke inference failed: {exc}", p95_ms=None, runs=0)
    expected = (1, num_classes) if num_classes else None
    if first.ndim != 2 or first.shape[0] != 1 or (expected is not None and first.shape != expected):
        want = f"{expected}" if expected else "(1, classes)"
        return HealthResult(
            ok=False, reason=f"output shape {first.shape}, expected {want}", p95_ms=None, runs=1
        )
    if not np.all(np.isfinite(first)):
        return HealthResult(ok=False, reason="output holds non-finite values", p95_ms=None, runs=1)
    timings = []
    for _ in range(max(1, runs)):
        started = time.perf_counter()
        session.run(None, {name: x})
        if extra_delay_ms:
            time.sleep(extra_delay_ms / 1000.0)
        timings.append((time.perf_counter() - started) * 1000.0)
    p95 = float(np.percentile(timings, 95))
    if latency_budget_ms is not None and p95 > latency_budget_ms:
        return HealthResult(
            ok=False,
            reason=f"p95 latency {p95:.3f} ms exceeds the budget of {latency_budget_ms:g} ms",
            p95_ms=p95,
            runs=len(timings),
        )
    return HealthResult(ok=True, reason="", p95_ms=p95, runs=len(timings), session=session)
