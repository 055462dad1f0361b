"""Metric gates: does the version under rollout behave well enough over the soak window?

A gate is `{"metric": name, ...thresholds, "min_samples": n}` with metric one of:

- `latency_p95_ms`: 95th percentile of `latency_ms` samples;
- `error_rate`: failed inferences over all inferences, sum(error) / (len(latency_ms) + sum(error))
  (a successful inference reports a latency, a failed one an `error` of 1.0);
- `accuracy`: mean of `correct` (labelled feedback, 1.0 or 0.0), for classification families;
- `mae`: mean of `abs_error` (the absolute error of a prediction that received its target),
  for regression families; like latency, lower is better.

`latency_p95_ms` and `error_rate` fit every family; `accuracy` and `mae` only the task
whose feedback they read (:func:`gates_for_task`).

Thresholds, any combination: `max` / `min` (absolute), `max_increase_pct` /
`max_decrease_pct` (relative to the version being replaced over the same window).
`abs_tolerance` (in the metric's unit, e.g. 2.0 ms) keeps relative thresholds from
firing on differences too small to matter: a relative threshold fails only when the
absolute difference also exceeds it (a p95 of 0.4 ms against 0.1 ms is +300% but
harmless scheduling noise).
Relative thresholds need `min_samples` on both sides; with too few samples the gate
is "waiting", neither passed nor failed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

GATE_METRICS: tuple[str, ...] = ("latency_p95_ms", "error_rate", "accuracy", "mae")
# The raw metric names each gate metric is computed from.
RAW_METRICS: dict[str, tuple[str, ...]] = {
    "latency_p95_ms": ("latency_ms",),
    "error_rate": ("latency_ms", "error"),
    "accuracy": ("correct",),
    "mae": ("abs_error",),
}
# Gate metrics that read a task's feedback fit only that task; the others fit any family.
GATE_TASKS: dict[str, str] = {"accuracy": "classification", "mae": "regression"}
THRESHOLD_KEYS = ("max", "min", "max_increase_pct", "max_decrease_pct")
OPTION_KEYS = ("abs_tolerance",)
DEFAULT_MIN_SAMPLES = 30

Samples = Mapping[str, npt.NDArray[np.float64]]
Outcome = Literal["passed", "failed", "waiting"]


def metric_value(*, metric: str, samples: Samples) -> tuple[float | None, int]:
    """The gate metric over raw samples: `(value, number of samples)`; value None if none."""
    empty = np.empty(0, dtype=np.float64)
    if metric == "latency_p95_ms":
        lat = np.asarray(samples.get("latency_ms", empty), dtype=np.float64)
        if lat.size == 0:
            return None, 0
        # "linear" interpolation between order statistics, numpy's default, for a p95
        # that moves smoothly as samples arrive.
        return float(np.percentile(lat, 95)), int(lat.size)
    if metric == "error_rate":
        lat = np.asarray(samples.get("latency_ms", empty), dtype=np.float64)
        err = np.asarray(samples.get("error", empty), dtype=np.float64)
        failures = float(err.sum())
        n = int(lat.size + failures)
        if n == 0:
            return None, 0
        return failures / n, n
    if metric in ("accuracy", "mae"):
        values = np.asarray(samples.get(RAW_METRICS[metric][0], empty), dtype=np.float64)
        if values.size == 0:
            return None, 0
        return float(values.mean()), int(values.size)
    raise ValueError(f"unknown gate metric {metric!r}")


def gates_for_task(task: str) -> tuple[str, ...]:
    """The gate metrics that fit a family of ``task`` (``classification`` or ``regression``)."""
    return tuple(m for m in GATE_METRICS if GATE_TASKS.get(m, task) == task)


def gates_not_for_task(*, gates: Sequence[Mapping[str, Any]], task: str) -> list[str]:
    """The metrics of ``gates`` that do not fit a family of ``task``, in order, once each."""
    fits = gates_for_task(task)
    return list(dict.fromkeys(str(g["metric"]) for g in gates if g["metric"] not in fits))


def raw_metrics_for(gates: Sequence[Mapping[str, Any]]) -> list[str]:
    """The raw metric names ``gates`` are computed from."""
    return sorted({name for g in gates for name in RAW_METRICS.get(str(g["metric"]), ())})


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict with the numbers behind it."""

    metric: str
    outcome: Outcome
    value: float | None
    samples: int
    baseline_value: float | None
    baseline_samples: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def validate_gates(*, gates: Any) -> list[dict[str, Any]]:
    """Check a gate list; raises KeyError for an unknown metric, ValueError otherwise."""
    if gates is None:
        return []
    if not isinstance(gates, list):
        raise ValueError("gates must be a list")
    clean: list[dict[str, Any]] = []
    for i, gate in enumerate(gates):
        if not isinstance(gate, dict) or "metric" not in gate:
            raise ValueError(f"gate {i} must be an object with a metric")
        if gate["metric"] not in GATE_METRICS:
            raise KeyError(str(gate["metric"]))
        thresholds = {k: float(gate[k]) for k in THRESHOLD_KEYS if gate.get(k) is not None}
        if not thresholds:
            raise ValueError(f"gate {i} ({gate['metric']}) needs at least one of {', '.join(THRESHOLD_KEYS)}")
        min_samples = int(gate.get("min_samples", DEFAULT_MIN_SAMPLES))
        if min_samples < 1:
            raise ValueError(f"gate {i}: min_samples must be >= 1")
        options = {k: float(gate[k]) for k in OPTION_KEYS if gate.get(k) is not None}
        if options.get("abs_tolerance", 0.0) < 0:
            raise ValueError(f"gate {i}: abs_tolerance must be >= 0")
        clean.append({"metric": gate["metric"], **thresholds, **options, "min_samples": min_samples})
    return clean


def evaluate_gate(*, gate: Mapping[str, Any], candidate: Samples, baseline: Samples | None) -> GateResult:
    """Judge one gate on the candidate's samples against the replaced version's."""
    metric = str(gate["metric"])
    min_samples = int(gate.get("min_samples", DEFAULT_MIN_SAMPLES))
    value, n = metric_value(metric=metric, samples=candidate)
    base_value, base_n = metric_value(metric=metric, samples=baseline or {})

    def result(outcome: Outcome, reason: str) -> GateResult:
        return GateResult(metric, outcome, value, n, base_value, base_n, reason)

    if value is None or n < min_samples:
        return result("waiting", f"{n} of {min_samples} samples")
    if gate.get("max") is not None and value > float(gate["max"]):
        return result("failed", f"{metric} {value:.4g} > max {float(gate['max']):.4g}")
    if gate.get("min") is not None and value < float(gate["min"]):
        return result("failed", f"{metric} {value:.4g} < min {float(gate['min']):.4g}")
    relative = [k for k in ("max_increase_pct", "max_decrease_pct") if gate.get(k) is not None]
    if relative:
        if base_value is None or base_n < min_samples:
            return result("waiting", f"baseline has {base_n} of {min_samples} samples")
        # Relative to the baseline's magnitude; an all-zero baseline (e.g. no errors at
        # all) makes any increase infinite, which is what an operator expects.
        denom = abs(base_value)
        change_pct = (
            (value - base_value) / denom * 100.0
            if denom > 0
            else (0.0 if value == base_value else np.inf * np.sign(value - base_value))
        )
        tolerance = float(gate.get("abs_tolerance") or 0.0)
        if abs(value - base_value) <= tolerance:
            return result("passed", f"within {tolerance:g} of the baseline")
        if gate.get("max_increase_pct") is not None and change_pct > float(gate["max_increase_pct"]):
            return result(
                "failed",
                f"{metric} {value:.4g} is {change_pct:+.1f}% vs {base_value:.4g} "
                f"(max increase {float(gate['max_increase_pct']):g}%)",
            )
        if gate.get("max_decrease_pct") is not None and -change_pct > float(gate["max_decrease_pct"]):
            return result(
                "failed",
                f"{metric} {value:.4g} is {change_pct:+.1f}% vs {base_value:.4g} "
                f"(max decrease {float(gate['max_decrease_pct']):g}%)",
            )
    return result("passed", "within thresholds")


def evaluate_gates(
    *, gates: Sequence[Mapping[str, Any]], candidate: Samples, baseline: Samples | None
) -> tuple[Outcome, list[GateResult]]:
    """All gates: failed if any failed, else waiting if any is waiting, else passed."""
    results = [evaluate_gate(gate=g, candidate=candidate, baseline=baseline) for g in gates]
    outcomes = {r.outcome for r in results}
    if "failed" in outcomes:
        return "failed", results
    if "waiting" in outcomes:
        return "waiting", results
    return "passed", results
