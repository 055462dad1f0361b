"""On-device inference over the active ONNX model, its metrics, and the health check.

:class:`Predictor` wraps an ONNX Runtime session with one intra-op thread (boards are small
and share their cores with the rest of the agent). Every prediction records its latency
and confidence; a prediction that later receives its true label (``feedback``) records
``correct``. Samples go to a callback, normally :meth:`devices_agent.outbox.Outbox.add`.

:func:`health_check` is what the updater runs before a new model may stay active: load
it, run a deterministic input of the family's input shape, check the output's shape and
finiteness, and compare the p95 latency of a few runs with the policy's budget.
"""

from __future__ import annotations

import collections
import functools
import itertools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.drift import DriftSketch

__all__ = [
    "HealthResult",
    "Prediction",
    "Predictor",
    "health_check",
    "load_session",
    "resource_usage",
    "to_probabilities",
]

Recorder = Callable[[str, float, int | None], None]


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


@dataclass(frozen=True)
class Prediction:
    """One inference: the top-1 label, its probability, and the wall time it took."""

    prediction_id: int
    label: int
    confidence: float
    latency_ms: float


class Predictor:
    """Inference over one ONNX model, recording latency, confidence and accuracy.

    ``record(name, value, version_id)`` receives every metric sample.
    ``extra_delay_ms`` slows every inference down on purpose: simulated slow boards use it
    so rollout gates see real latency differences between devices.
    """

    def __init__(
        self,
        *,
        model: Path | bytes,
        version_id: int | None = None,
        record: Recorder | None = None,
        extra_delay_ms: float = 0.0,
        threads: int = 1,
        session: Any = None,
        max_open_predictions: int = 10_000,
    ) -> None:
        self.version_id = version_id
        self.session = session if session is not None else load_session(model, threads=threads)
        self.input_name = self.session.get_inputs()[0].name
        self.record = record
        self.extra_delay_ms = max(0.0, extra_delay_ms)
        self._ids = itertools.count(1)
        # Predictions waiting for a labelled feedback; bounded so unlabelled traffic
        # cannot grow memory without limit (the oldest are forgotten).
        self._open: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._max_open = max_open_predictions
        self._lock = threading.Lock()
        # Sized on the first input: the feature count is the model's, read off the data.
        self.drift: DriftSketch | None = None

    def _emit(self, name: str, value: float) -> None:
        if self.record is not None:
            self.record(name, float(value), self.version_id)

    def predict(self, x: npt.ArrayLike, *, label: int | None = None) -> Prediction:
        """Classify one example; with ``label`` (simulation), record ``correct`` at once."""
        batch = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(1, -1))
        started = time.perf_counter()
        try:
            outputs = self.session.run(None, {self.input_name: batch})[0]
            if self.extra_delay_ms:
                time.sleep(self.extra_delay_ms / 1000.0)
        except Exception:
            self._emit("error", 1.0)
            raise
        latency_ms = (time.perf_counter() - started) * 1000.0
        probs = to_probabilities(np.asarray(outputs))[0]
        top = int(np.argmax(probs))
        prediction = Prediction(
            prediction_id=next(self._ids), label=top, confidence=float(probs[top]), latency_ms=latency_ms
        )
        self._emit("latency_ms", latency_ms)
        self._emit("confidence", prediction.confidence)
        with self._lock:
            if self.drift is None or self.drift.num_features != batch.shape[1]:
                self.drift = DriftSketch(num_features=batch.shape[1])
            self.drift.update(inputs=batch, confidence=[prediction.confidence])
        if label is not None:
            self._emit("correct", 1.0 if top == int(label) else 0.0)
        else:
            with self._lock:
                self._open[prediction.prediction_id] = top
                while len(self._open) > self._max_open:
                    self._open.popitem(last=False)
        return prediction

    def predict_batch(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Class probabilities for a batch (no metrics: for tools and benchmarks)."""
        batch = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
        return to_probabilities(np.asarray(self.session.run(None, {self.input_name: batch})[0]))

    def feedback(self, prediction_id: int, label: int) -> bool:
        """Record whether an earlier prediction was right; False when the id is unknown or expired."""
        with self._lock:
            predicted = self._open.pop(prediction_id, None)
        if predicted is None:
            return False
        self._emit("correct", 1.0 if predicted == int(label) else 0.0)
        return True


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
