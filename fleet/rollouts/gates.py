"""Metric gates: does the version under rollout behave well enough over the soak window?

Decisions count devices, not samples. Each device reporting for a version gets one value
per gate metric, from its own samples over the window, and casts one vote:

- `latency_p95_ms`: the 95th percentile of the device's `latency_ms` samples;
- `error_rate`: the device's failed inferences over all its inferences,
  sum(error) / (len(latency_ms) + sum(error)) (a successful inference reports a latency,
  a failed one an `error` of 1.0);
- `accuracy`: the mean of the device's `correct` (labelled feedback, 1.0 or 0.0), for
  classification families;
- `mae`: the mean of the device's `abs_error` (the absolute error of a prediction that
  received its target), for regression families; like latency, lower is better.

A device votes once it has `min_samples` samples of the metric (default 30); the gate's
value is the **median** of the votes, and it judges once `min_devices` devices voted
(default 3), else it is "waiting". So one device reporting thousands of extreme samples
moves the value by at most one rank among the honest devices: it can neither fail a good
version nor pass a bad one.

`latency_p95_ms` and `error_rate` fit every family; `accuracy` and `mae` only the task
whose feedback they read (:func:`gates_for_task`).

Thresholds, any combination: `max` / `min` (absolute, on the candidate's median),
`max_increase_pct` / `max_decrease_pct` (relative to the baseline's median: the version
being replaced, on the rollout's own devices, over the same window). `abs_tolerance` (in
the metric's unit, e.g. 2.0 ms) keeps relative thresholds from firing on differences too
small to matter: a relative threshold fails only when the absolute difference also
exceeds it (a p95 of 0.4 ms against 0.1 ms is +300% but harmless scheduling noise).
Relative thresholds need `min_devices` voting devices on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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
# Raw metrics whose per-device 95th percentile a gate reads (the others need counts and sums).
PERCENTILE_METRICS: dict[str, str] = {"latency_p95_ms": "latency_ms"}
# Gate metrics that read a task's feedback fit only that task; the others fit any family.
GATE_TASKS: dict[str, str] = {"accuracy": "classification", "mae": "regression"}
THRESHOLD_KEYS = ("max", "min", "max_increase_pct", "max_decrease_pct")
OPTION_KEYS = ("abs_tolerance",)
DEFAULT_MIN_SAMPLES = 30  # per device
DEFAULT_MIN_DEVICES = 3

Outcome = Literal["passed", "failed", "waiting"]


@dataclass(frozen=True)
class DeviceSummary:
    """One device's samples of one raw metric over a window: count, sum, and the 95th
    percentile where a gate needs it (the only figure a mean cannot give)."""

    n: int
    total: float
    p95: float | None = None

    @property
    def mean(self) -> float:
        return self.total / self.n if self.n else float("nan")


# Device id -> raw metric name -> summary: what a set of devices reported for a version.
DeviceStats = Mapping[str, Mapping[str, DeviceSummary]]


def summarise(values: npt.ArrayLike, *, p95: bool = False) -> DeviceSummary:
    """A device's summary from its raw values (for tests and simulations; the server
    aggregates in SQL)."""
    arr = np.asarray(values, dtype=np.float64)
    # "linear" interpolation between order statistics, numpy's default, for a p95 that
    # moves smoothly as samples arrive; PostgreSQL's percentile_cont agrees.
    q = float(np.percentile(arr, 95)) if p95 and arr.size else None
    return DeviceSummary(n=int(arr.size), total=float(arr.sum()), p95=q)


def stats_from_samples(
    devices: Mapping[str, Mapping[str, npt.ArrayLike]],
) -> dict[str, dict[str, DeviceSummary]]:
    """`{device: {raw metric: values}}` -> :data:`DeviceStats` (p95 where a gate reads one)."""
    wanted = set(PERCENTILE_METRICS.values())
    return {
        str(device): {str(name): summarise(v, p95=name in wanted) for name, v in metrics.items()}
        for device, metrics in devices.items()
    }


def device_value(*, metric: str, summaries: Mapping[str, DeviceSummary]) -> tuple[float | None, int]:
    """One device's value of a gate metric and the number of samples behind it."""
    if metric == "latency_p95_ms":
        lat = summaries.get("latency_ms")
        if lat is None or lat.n == 0 or lat.p95 is None:
            return None, 0
        return float(lat.p95), lat.n
    if metric == "error_rate":
        lat = summaries.get("latency_ms")
        err = summaries.get("error")
        failures = float(err.total) if err is not None else 0.0
        n = int((lat.n if lat is not None else 0) + failures)
        if n == 0:
            return None, 0
        return failures / n, n
    if metric in ("accuracy", "mae"):
        found = summaries.get(RAW_METRICS[metric][0])
        if found is None or found.n == 0:
            return None, 0
        return float(found.mean), found.n
    raise ValueError(f"unknown gate metric {metric!r}")


@dataclass(frozen=True)
class MetricValue:
    """A gate metric over a set of devices: the median of the voting devices' values."""

    value: float | None
    devices: int  # devices that voted (had min_samples samples)
    samples: int  # samples behind those votes
    short: int  # devices that reported fewer than min_samples samples


def metric_value(*, metric: str, stats: DeviceStats, min_samples: int = DEFAULT_MIN_SAMPLES) -> MetricValue:
    """The median, over devices with at least ``min_samples`` samples, of their values."""
    values: list[float] = []
    samples = short = 0
    for summaries in stats.values():
        value, n = device_value(metric=metric, summaries=summaries)
        if value is None:
            continue
        if n < min_samples:
            short += 1
            continue
        values.append(value)
        samples += n
    if not values:
        return MetricValue(None, 0, 0, short)
    return MetricValue(float(np.median(values)), len(values), samples, short)


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


def percentile_metrics_for(gates: Sequence[Mapping[str, Any]]) -> list[str]:
    """The raw metric names whose per-device 95th percentile ``gates`` read."""
    return sorted(
        {PERCENTILE_METRICS[str(g["metric"])] for g in gates if str(g["metric"]) in PERCENTILE_METRICS}
    )


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict with the numbers behind it: medians over devices, the devices
    that voted and the samples behind their votes."""

    metric: str
    outcome: Outcome
    value: float | None
    samples: int
    baseline_value: float | None
    baseline_samples: int
    reason: str
    devices: int = 0
    baseline_devices: int = 0

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
        min_devices = int(gate.get("min_devices", DEFAULT_MIN_DEVICES))
        if min_devices < 1:
            raise ValueError(f"gate {i}: min_devices must be >= 1")
        options = {k: float(gate[k]) for k in OPTION_KEYS if gate.get(k) is not None}
        if options.get("abs_tolerance", 0.0) < 0:
            raise ValueError(f"gate {i}: abs_tolerance must be >= 0")
        clean.append(
            {
                "metric": gate["metric"],
                **thresholds,
                **options,
                "min_samples": min_samples,
                "min_devices": min_devices,
            }
        )
    return clean


def _waiting_reason(side: str, found: MetricValue, *, min_devices: int, min_samples: int) -> str:
    short = f"; {found.short} more with fewer samples" if found.short else ""
    return f"{side}{found.devices} of {min_devices} devices with {min_samples}+ samples{short}"


def evaluate_gate(
    *, gate: Mapping[str, Any], candidate: DeviceStats, baseline: DeviceStats | None
) -> GateResult:
    """Judge one gate on the candidate's devices against the replaced version's devices."""
    metric = str(gate["metric"])
    min_samples = int(gate.get("min_samples", DEFAULT_MIN_SAMPLES))
    min_devices = int(gate.get("min_devices", DEFAULT_MIN_DEVICES))
    found = metric_value(metric=metric, stats=candidate, min_samples=min_samples)
    base = metric_value(metric=metric, stats=baseline or {}, min_samples=min_samples)
    value, base_value = found.value, base.value

    def result(outcome: Outcome, reason: str) -> GateResult:
        return GateResult(
            metric,
            outcome,
            value,
            found.samples,
            base_value,
            base.samples,
            reason,
            found.devices,
            base.devices,
        )

    if value is None or found.devices < min_devices:
        return result("waiting", _waiting_reason("", found, min_devices=min_devices, min_samples=min_samples))
    of = f"median of {found.devices} devices"
    if gate.get("max") is not None and value > float(gate["max"]):
        return result("failed", f"{metric} {value:.4g} ({of}) > max {float(gate['max']):.4g}")
    if gate.get("min") is not None and value < float(gate["min"]):
        return result("failed", f"{metric} {value:.4g} ({of}) < min {float(gate['min']):.4g}")
    relative = [k for k in ("max_increase_pct", "max_decrease_pct") if gate.get(k) is not None]
    if relative:
        if base_value is None or base.devices < min_devices:
            return result(
                "waiting",
                _waiting_reason("baseline has ", base, min_devices=min_devices, min_samples=min_samples),
            )
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
        against = f"{base_value:.4g} (median of {base.devices} devices)"
        if gate.get("max_increase_pct") is not None and change_pct > float(gate["max_increase_pct"]):
            return result(
                "failed",
                f"{metric} {value:.4g} ({of}) is {change_pct:+.1f}% vs {against} "
                f"(max increase {float(gate['max_increase_pct']):g}%)",
            )
        if gate.get("max_decrease_pct") is not None and -change_pct > float(gate["max_decrease_pct"]):
            return result(
                "failed",
                f"{metric} {value:.4g} ({of}) is {change_pct:+.1f}% vs {against} "
                f"(max decrease {float(gate['max_decrease_pct']):g}%)",
            )
    return result("passed", "within thresholds")


def evaluate_gates(
    *, gates: Sequence[Mapping[str, Any]], candidate: DeviceStats, baseline: DeviceStats | None
) -> tuple[Outcome, list[GateResult]]:
    """All gates: failed if any failed, else waiting if any is waiting, else passed."""
    results = [evaluate_gate(gate=g, candidate=candidate, baseline=baseline) for g in gates]
    return combined_outcome(r.outcome for r in results), results


def combined_outcome(outcomes: Iterable[Outcome]) -> Outcome:
    """Failed if any failed, else waiting if any is waiting, else passed."""
    seen = set(outcomes)
    if "failed" in seen:
        return "failed"
    if "waiting" in seen:
        return "waiting"
    return "passed"
