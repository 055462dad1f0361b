"""Shadow deployments on the board: a candidate version beside the active one, never answering.

The server names a candidate in the heartbeat answer (``wire.ShadowModel``). The agent
downloads its ONNX graph through the same resumable, signed and verified path as any
artifact (:func:`devices_agent.learning.fetch_artifact`; the statement must name the
shadow version and kind ``onnx``), keeps it under ``<state_dir>/shadow`` and never
installs it as the active model. The local API hands each answered prediction to
:class:`ShadowRunner`, which

- samples it with probability ``sample_rate`` (a seeded generator);
- skips it when the budget would be exceeded: the running average shadow latency times
  the prediction rate times the sample rate against ``max_cpu_percent`` of one core, and
  the average latency times the sample rate against ``budget_ms`` per prediction. While
  over budget one probe ``probe_every_s`` after the last run refreshes the average, so a
  candidate that got faster (or a prediction rate that fell) is noticed;
- runs the candidate on the same input in its own worker thread, after the application
  already has its answer (the active model's, untouched), and records
  ``shadow_agreement`` (same label, or every output within ``tolerance``) and
  ``shadow_latency_ms``;
- remembers the candidate's output for the prediction (bounded), so that a feedback for
  it records ``shadow_correct`` (classification) or ``shadow_error`` (regression); a
  feedback that arrives before the shadow ran (or for a skipped prediction) records none.

Every metric is tagged with the shadow version's id.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.family import FamilySpec, SpecError, feedback_metric

__all__ = ["ShadowModel", "ShadowRunner"]

log = logging.getLogger("devices_agent.shadow")

Recorder = Callable[[str, float, int | None], None]

# Feedback metric of the active model -> the shadow's.
_FEEDBACK_NAMES = {"correct": "shadow_correct", "abs_error": "shadow_error"}


@dataclass
class ShadowModel:
    """The candidate: an ONNX Runtime session, its contract and the server's policy."""

    shadow_id: int
    version_id: int
    spec: FamilySpec
    session: Any
    sample_rate: float = 1.0
    max_cpu_percent: float | None = None
    budget_ms: float | None = None
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        """The candidate's outputs, one row per example."""
        outputs = self.session.run(None, {self.input_name: batch})[0]
        return np.asarray(outputs, dtype=np.float64).reshape(len(batch), -1)


@dataclass
class _Job:
    model: ShadowModel
    ids: list[int]
    x: npt.NDArray[Any]
    active: npt.NDArray[np.float64]


class ShadowRunner:
    """Runs the shadow model on sampled predictions within the budget (module docstring).

    ``threaded=False`` runs each shadow inference in the caller's thread after the
    application's answer is computed (tests); the agent runs a worker thread with a
    bounded queue, so a burst of predictions drops shadow work rather than queueing it.
    """

    def __init__(
        self,
        *,
        record: Recorder,
        seed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        threaded: bool = True,
        queue_size: int = 64,
        rate_window_s: float = 10.0,
        probe_every_s: float = 30.0,
        max_remembered: int = 10_000,
    ) -> None:
        self.record = record
        self.rng = random.Random(seed)
        self.clock = clock
        self.threaded = threaded
        self.rate_window_s = rate_window_s
        self.probe_every_s = probe_every_s
        self.max_remembered = max_remembered
        self._model: ShadowModel | None = None
        self._lock = threading.Lock()
        self._avg_ms: float | None = None
        self._arrivals: collections.deque[tuple[float, int]] = collections.deque()
        self._last_run = float("-inf")  # when shadow work was last taken (clock)
        self._skipped = 0
        self._remembered: collections.OrderedDict[int, tuple[int, npt.NDArray[np.float64]]] = (
            collections.OrderedDict()
        )
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._busy = 0
        self._idle = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    # --- the model -------------------------------------------------------------------
    @property
    def model(self) -> ShadowModel | None:
        """The shadow model in use, or None."""
        return self._model

    def set_model(self, model: ShadowModel | None) -> None:
        """Shadow with ``model`` from now on (None: stop); a new version resets the average."""
        with self._lock:
            if model is None or self._model is None or self._model.version_id != model.version_id:
                self._avg_ms = None
                self._remembered.clear()
            self._model = model
        if model is not None and self.threaded and self._thread is None:
            self._thread = threading.Thread(target=self._work, name="agent-shadow", daemon=True)
            self._thread.start()

    def take_skipped(self) -> tuple[int, int | None]:
        """Predictions the budget skipped since the last call, and the shadow version's id."""
        with self._lock:
            skipped, self._skipped = self._skipped, 0
            model = self._model
        return skipped, model.version_id if model is not None else None

    def average_ms(self) -> float | None:
        """The running average latency of one shadow inference (per example), or None."""
        return self._avg_ms

    # --- predictions -----------------------------------------------------------------
    def offer(
        self,
        *,
        ids: list[int],
        x: npt.NDArray[Any],
        active_outputs: npt.NDArray[np.float64],
        spec: FamilySpec,
    ) -> int:
        """Consider answered predictions for shadowing; returns how many were taken.

        Called after the application's answer is built: whatever happens here, that
        answer is the active model's. A candidate whose contract differs from the active
        model's (input shape, dtype, task) shadows nothing.
        """
        model = self._model
        if model is None or not ids:
            return 0
        if not _same_contract(model.spec, spec):
            return 0
        now = self.clock()
        with self._lock:
            self._arrivals.append((now, len(ids)))
            while self._arrivals and self._arrivals[0][0] < now - self.rate_window_s:
                self._arrivals.popleft()
            chosen = [i for i in range(len(ids)) if self.rng.random() < model.sample_rate]
            if not chosen:
                return 0
            if self._over_budget(model, now):
                if now - self._last_run < self.probe_every_s:
                    self._skipped += len(chosen)
                    return 0
                # One probe refreshes the average; the rest of the batch is skipped.
                self._skipped += len(chosen) - 1
                chosen = chosen[:1]
            self._last_run = now
        job = _Job(
            model=model,
            ids=[ids[i] for i in chosen],
            x=np.array(x[chosen], copy=True),
            active=np.array(active_outputs[chosen], copy=True),
        )
        if not self.threaded:
            self._run(job)
            return len(chosen)
        with self._lock:
            self._busy += 1
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self._busy -= 1
                self._skipped += len(chosen)
                self._idle.notify_all()
            return 0
        return len(chosen)

    def _rate_per_s(self, now: float) -> float:
        if not self._arrivals:
            return 0.0
        count = sum(n for _, n in self._arrivals)
        # At least one second of window: a first burst is not read as an infinite rate.
        span = max(1.0, min(self.rate_window_s, now - self._arrivals[0][0]))
        return count / span

    def _over_budget(self, model: ShadowModel, now: float) -> bool:
        avg = self._avg_ms
        if avg is None:
            return False
        if model.budget_ms is not None and avg * model.sample_rate > model.budget_ms:
            return True
        if model.max_cpu_percent is not None:
            share = avg / 1000.0 * self._rate_per_s(now) * model.sample_rate * 100.0
            if share > model.max_cpu_percent:
                return True
        return False

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 - shadow work never stops the agent
                log.exception("shadow inference failed")
            finally:
                with self._lock:
                    self._busy -= 1
                    self._idle.notify_all()

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait until queued shadow work is done (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def _run(self, job: _Job) -> None:
        model = job.model
        started = time.perf_counter()
        try:
            outputs = model.run(job.x)
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot run is counted, not raised
            log.warning("shadow version %s failed: %s", model.version_id, exc)
            self.record("error", 1.0, model.version_id)
            return
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        per_example = elapsed_ms / len(job.ids)
        with self._lock:
            self._avg_ms = per_example if self._avg_ms is None else 0.8 * self._avg_ms + 0.2 * per_example
            for prediction_id, out in zip(job.ids, outputs, strict=True):
                self._remembered[prediction_id] = (model.version_id, np.array(out, copy=True))
            while len(self._remembered) > self.max_remembered:
                self._remembered.popitem(last=False)
        self.record("shadow_latency_ms", elapsed_ms, model.version_id)
        for active, shadow in zip(job.active, outputs, strict=True):
            self.record("shadow_agreement", 1.0 if _agree(model, active, shadow) else 0.0, model.version_id)

    # --- feedback --------------------------------------------------------------------
    def feedback(self, prediction_id: int, label: Any) -> str | None:
        """Score the shadow's answer of a prediction against its label; returns the metric name.

        Nothing happens for a prediction that was not shadowed (or whose shadow answer
        was forgotten), or for a label the contract refuses (the active path says why).
        """
        with self._lock:
            found = self._remembered.pop(prediction_id, None)
            model = self._model
        if found is None or model is None:
            return None
        version_id, output = found
        if version_id != model.version_id:
            return None
        try:
            name, value = feedback_metric(model.spec, output, label)
        except SpecError:
            return None
        shadow_name = _FEEDBACK_NAMES.get(name)
        if shadow_name is None:
            return None
        self.record(shadow_name, value, version_id)
        return shadow_name

    def close(self) -> None:
        """Stop the worker thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None


def _same_contract(a: FamilySpec, b: FamilySpec) -> bool:
    return (
        a.task == b.task and tuple(a.input_shape) == tuple(b.input_shape) and a.input_dtype == b.input_dtype
    )


def _agree(model: ShadowModel, active: npt.NDArray[np.float64], shadow: npt.NDArray[np.float64]) -> bool:
    if model.spec.task == "classification":
        return int(np.argmax(active)) == int(np.argmax(shadow))
    if active.shape != shadow.shape:
        return False
    return bool(np.all(np.abs(active - shadow) <= model.tolerance))
