"""A control cohort: devices of a rollout's target that stay on the incumbent while it runs.

With ``control_percent`` set, a deterministic, seeded share of the target is held back:
the target's devices are ranked by their hash for the rollout (``control:<rollout id>``,
see :func:`fleet.rollouts.waves.rank_key`) and the first ``ceil(percent x target)`` are the
control cohort (:func:`choose_control`). The cohort is chosen once, when the rollout is
created, and kept on the rollout, so a device is control or not for the rollout's whole
life; a device that joins the target later takes part in the waves.

Control gates then compare the devices that got the version (the wave's devices) with the
control devices **over the same time window**, each device one observation (its own value
of the gate metric from :func:`fleet.rollouts.gates.device_value`), with the mSPRT of
:mod:`fleet.rollouts.stats`. Its confidence sequence is valid at every look at once, so the
rollout engine may judge on every tick: under no difference the chance that any look ever
fails the wave is at most ``alpha`` (:func:`aa_false_positive_rate` measures it).

A gate fails when the whole confidence sequence for candidate minus control lies on the
worse side beyond ``margin`` (in the metric's unit): the candidate is worse, and the data
say so with the test's confidence. It passes otherwise, once ``min_devices`` devices with
``min_samples`` samples voted on **both** sides; before that it waits. Each side is
winsorised (its ``trim`` most extreme values on either end set to the next one in) before
the test, so one poisoned device can neither fail a good version nor hide a bad one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fleet.rollouts.gates import (
    DEFAULT_MIN_SAMPLES,
    GATE_METRICS,
    DeviceStats,
    Outcome,
    combined_outcome,
    device_value,
)
from fleet.rollouts.stats import msprt
from fleet.rollouts.waves import rank_key

# Metrics where a larger value is better; for the others (latency, error rate, mae) lower is.
HIGHER_IS_BETTER = frozenset({"accuracy"})
DEFAULT_CONTROL_MIN_DEVICES = 5
DEFAULT_ALPHA = 0.05
# tau (the scale of differences the test is most sensitive to), per metric, in its unit.
DEFAULT_TAU: dict[str, float] = {"accuracy": 0.05, "error_rate": 0.02, "latency_p95_ms": 2.0, "mae": 0.1}
MAX_CONTROL_PERCENT = 50.0


def choose_control(*, rollout_id: int, device_ids: Sequence[str], percent: float) -> list[str]:
    """The control cohort: the ``ceil(percent% x len(device_ids))`` devices ranked first by
    their seeded hash for the rollout (none for a share of 0)."""
    if percent <= 0 or not device_ids:
        return []
    ranked = sorted(
        (str(d) for d in device_ids), key=lambda d: rank_key(salt=f"control:{rollout_id}", device_id=d)
    )
    # Round before ceil so 20% of 30 devices is 6, not 7 from 6.000000000000001.
    size = math.ceil(round(percent * len(ranked) / 100.0, 9))
    return ranked[:size]


def split_control(
    *, rollout_id: int, device_ids: Sequence[str], percent: float
) -> tuple[list[str], list[str]]:
    """``(treated, control)``: the devices that take part in the waves, and the cohort."""
    control = choose_control(rollout_id=rollout_id, device_ids=device_ids, percent=percent)
    chosen = set(control)
    return [str(d) for d in device_ids if str(d) not in chosen], control


def validate_control_percent(value: Any) -> float:
    """A control share in [0, 50] (percent of the target); raises ValueError otherwise."""
    try:
        percent = float(value)
    except (TypeError, ValueError):
        raise ValueError("control_percent must be a number") from None
    if not math.isfinite(percent) or not 0 <= percent <= MAX_CONTROL_PERCENT:
        raise ValueError(f"control_percent must be between 0 and {MAX_CONTROL_PERCENT:g}")
    return percent


def validate_control_gates(*, gates: Any) -> list[dict[str, Any]]:
    """Check a control-gate list; raises KeyError for an unknown metric, ValueError otherwise."""
    if gates is None:
        return []
    if not isinstance(gates, list):
        raise ValueError("control_gates must be a list")
    clean: list[dict[str, Any]] = []
    for i, gate in enumerate(gates):
        if not isinstance(gate, dict) or "metric" not in gate:
            raise ValueError(f"control gate {i} must be an object with a metric")
        metric = str(gate["metric"])
        if metric not in GATE_METRICS:
            raise KeyError(metric)
        margin = float(gate.get("margin", 0.0))
        alpha = float(gate.get("alpha", DEFAULT_ALPHA))
        tau = float(gate.get("tau", DEFAULT_TAU[metric]))
        min_devices = int(gate.get("min_devices", DEFAULT_CONTROL_MIN_DEVICES))
        min_samples = int(gate.get("min_samples", DEFAULT_MIN_SAMPLES))
        if margin < 0:
            raise ValueError(f"control gate {i}: margin must be >= 0")
        if not 0 < alpha < 0.5:
            raise ValueError(f"control gate {i}: alpha must be in (0, 0.5)")
        if tau <= 0:
            raise ValueError(f"control gate {i}: tau must be > 0")
        if min_devices < 3:
            raise ValueError(f"control gate {i}: min_devices must be >= 3 (a spread needs devices)")
        if min_samples < 1:
            raise ValueError(f"control gate {i}: min_samples must be >= 1")
        clean.append(
            {
                "metric": metric,
                "margin": margin,
                "alpha": alpha,
                "tau": tau,
                "min_devices": min_devices,
                "min_samples": min_samples,
            }
        )
    return clean


def control_minimum(gates: Sequence[Mapping[str, Any]]) -> int:
    """The fewest control devices the gates can judge with."""
    return max([int(g.get("min_devices", DEFAULT_CONTROL_MIN_DEVICES)) for g in gates] or [0])


def winsorise(values: npt.ArrayLike, *, trim: int) -> npt.NDArray[np.float64]:
    """Set the ``trim`` smallest and largest values to the next value in (order kept)."""
    arr = np.asarray(values, dtype=np.float64).copy()
    if trim <= 0 or arr.size <= 2 * trim:
        return arr
    ranked = np.sort(arr)
    return np.clip(arr, ranked[trim], ranked[-trim - 1])


def robust_mean_var(values: Sequence[float], *, alpha: float) -> tuple[float, float]:
    """A side's trimmed mean and the per-device variance that gives its standard error.

    Yuen's trimmed mean: drop the :func:`default_trim` extreme values on each end, and take
    the error from the winsorised variance, ``(n-1) s_w^2 / (h (h-1))`` with ``h`` values
    kept. Few devices make a plug-in variance too small too often, so it is widened by
    ``(t_{h-1} / z)^2`` at ``alpha``: the normal mixture then holds its level from a
    handful of devices on (see :func:`aa_false_positive_rate`).
    """
    from scipy import special

    arr = np.asarray(values, dtype=np.float64)
    n = int(arr.size)
    g = default_trim(n)
    h = n - 2 * g
    ranked = np.sort(arr)
    mean = float(ranked[g : n - g].mean())
    s_w2 = float(winsorise(arr, trim=g).var(ddof=1))
    se2 = (n - 1) * s_w2 / (h * (h - 1))
    widen = (float(special.stdtrit(h - 1, 1 - alpha / 2)) / float(special.ndtri(1 - alpha / 2))) ** 2
    return mean, se2 * widen * n


def default_trim(n: int) -> int:
    """How many values to winsorise on each end: one from 5 devices, a tenth from 20."""
    return 0 if n < 5 else max(1, n // 10)


@dataclass(frozen=True)
class Side:
    """One side's numbers: voting devices, samples behind them, and their values' summary."""

    devices: int
    samples: int
    short: int
    mean: float | None
    median: float | None
    sd: float | None


@dataclass(frozen=True)
class ControlResult:
    """A control gate's verdict: candidate minus control, with the sequential test's numbers."""

    metric: str
    outcome: Outcome
    reason: str
    candidate: Side
    control: Side
    diff: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    e_value: float | None = None
    p_value: float | None = None
    margin: float = 0.0
    alpha: float = DEFAULT_ALPHA
    higher_is_better: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("e_value",):
            value = data.get(key)
            if isinstance(value, float) and not math.isfinite(value):
                data[key] = None if math.isnan(value) else 1e300
        return data


def _values(*, metric: str, stats: DeviceStats, min_samples: int) -> tuple[list[float], int, int]:
    values: list[float] = []
    samples = short = 0
    for summaries in stats.values():
        value, n = device_value(metric=metric, summaries=summaries)
        if value is None:
            continue
        if n < min_samples:
            short += 1
            continue
        values.append(float(value))
        samples += n
    return values, samples, short


def _side(values: Sequence[float], samples: int, short: int) -> Side:
    if not values:
        return Side(0, samples, short, None, None, None)
    arr = np.asarray(values, dtype=np.float64)
    sd = float(arr.std(ddof=1)) if arr.size > 1 else None
    return Side(len(values), samples, short, float(arr.mean()), float(np.median(arr)), sd)


def judge_values(
    *, gate: Mapping[str, Any], candidate: npt.ArrayLike, control: npt.ArrayLike
) -> ControlResult:
    """Judge per-device values of the candidate's devices against the control's (pure)."""
    cand = [float(x) for x in np.asarray(candidate, dtype=np.float64).ravel()]
    ctrl = [float(x) for x in np.asarray(control, dtype=np.float64).ravel()]
    return _judge(gate=gate, cand=cand, ctrl=ctrl, cand_n=0, ctrl_n=0)


def judge_against_control(
    *, gate: Mapping[str, Any], candidate: DeviceStats, control: DeviceStats
) -> ControlResult:
    """Judge one control gate on the devices' summaries over the same window."""
    metric = str(gate["metric"])
    min_samples = int(gate.get("min_samples", DEFAULT_MIN_SAMPLES))
    cand, cand_n, cand_short = _values(metric=metric, stats=candidate, min_samples=min_samples)
    ctrl, ctrl_n, ctrl_short = _values(metric=metric, stats=control, min_samples=min_samples)
    return _judge(
        gate=gate, cand=cand, ctrl=ctrl, cand_n=cand_n, ctrl_n=ctrl_n, shorts=(cand_short, ctrl_short)
    )


def _judge(
    *,
    gate: Mapping[str, Any],
    cand: list[float],
    ctrl: list[float],
    cand_n: int,
    ctrl_n: int,
    shorts: tuple[int, int] = (0, 0),
) -> ControlResult:
    metric = str(gate["metric"])
    min_devices = int(gate.get("min_devices", DEFAULT_CONTROL_MIN_DEVICES))
    margin = float(gate.get("margin", 0.0))
    alpha = float(gate.get("alpha", DEFAULT_ALPHA))
    tau = float(gate.get("tau", DEFAULT_TAU.get(metric, 1.0)))
    higher = metric in HIGHER_IS_BETTER
    cand_side = _side(cand, cand_n, shorts[0])
    ctrl_side = _side(ctrl, ctrl_n, shorts[1])
    common: dict[str, Any] = {"margin": margin, "alpha": alpha, "higher_is_better": higher}
    if len(cand) < min_devices or len(ctrl) < min_devices:
        reason = (
            f"candidate {len(cand)}, control {len(ctrl)} of {min_devices} devices each "
            f"with {int(gate.get('min_samples', DEFAULT_MIN_SAMPLES))}+ samples"
        )
        return ControlResult(metric, "waiting", reason, cand_side, ctrl_side, **common)
    a_mean, a_var = robust_mean_var(ctrl, alpha=alpha)
    b_mean, b_var = robust_mean_var(cand, alpha=alpha)
    look = msprt(
        mean_a=a_mean,
        var_a=a_var,
        n_a=len(ctrl),
        mean_b=b_mean,
        var_b=b_var,
        n_b=len(cand),
        tau=tau,
        alpha=alpha,
    )
    numbers: dict[str, Any] = {
        "diff": look.diff,
        "ci_low": look.ci_low,
        "ci_high": look.ci_high,
        "e_value": look.e_value,
        "p_value": look.p_value,
        **common,
        "extra": {"tau": tau, "winsorised": [default_trim(len(cand)), default_trim(len(ctrl))]},
    }
    worse = look.ci_high < -margin if higher else look.ci_low > margin
    of = f"{len(cand)} vs {len(ctrl)} control devices"
    interval = f"[{look.ci_low:+.4g}, {look.ci_high:+.4g}]"
    if worse:
        reason = (
            f"{metric} candidate minus control {look.diff:+.4g} ({of}), always-valid "
            f"{1 - alpha:.0%} interval {interval} is worse beyond margin {margin:g}"
        )
        return ControlResult(metric, "failed", reason, cand_side, ctrl_side, **numbers)
    reason = f"{metric} candidate minus control {look.diff:+.4g} ({of}), interval {interval}: not worse"
    return ControlResult(metric, "passed", reason, cand_side, ctrl_side, **numbers)


def judge_all(
    *, gates: Sequence[Mapping[str, Any]], candidate: DeviceStats, control: DeviceStats
) -> tuple[Outcome, list[ControlResult]]:
    """Every control gate: failed if any failed, else waiting if any waits, else passed."""
    results = [judge_against_control(gate=g, candidate=candidate, control=control) for g in gates]
    return combined_outcome(r.outcome for r in results), results


def aa_false_positive_rate(
    *,
    runs: int,
    looks: int,
    devices_per_side: int,
    samples_per_look: int,
    seed: int,
    gate: Mapping[str, Any] | None = None,
    device_sd: float = 0.03,
    base: float = 0.9,
) -> float:
    """Share of A/A rollouts (no difference at all) a control gate ever fails in ``looks`` looks.

    Each device has its own accuracy (``base`` plus a device effect of sd ``device_sd``),
    reports ``samples_per_look`` 0/1 samples between looks, and is judged at every look on
    its running mean, exactly as the engine does on every tick.
    """
    rng = np.random.default_rng(seed)
    judged = dict(gate or {"metric": "accuracy", "min_samples": 1})
    failures = 0
    for _ in range(runs):
        p = np.clip(base + rng.normal(0, device_sd, 2 * devices_per_side), 0.01, 0.99)
        hits = np.zeros(2 * devices_per_side)
        n = 0
        for _look in range(looks):
            hits += rng.binomial(samples_per_look, p)
            n += samples_per_look
            means = hits / n
            result = judge_values(
                gate=judged, candidate=means[devices_per_side:], control=means[:devices_per_side]
            )
            if result.outcome == "failed":
                failures += 1
                break
    return failures / runs
