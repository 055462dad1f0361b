"""Pure rollout logic: policies, wave membership, arm assignment, gates. No database."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid5

import numpy as np
import pytest

from fleet.rollouts.gates import (
    evaluate_gate,
    evaluate_gates,
    metric_value,
    stats_from_samples,
    validate_gates,
)
from fleet.rollouts.policy import in_maintenance_window, training_allowed
from fleet.rollouts.waves import assign_arm, cumulative_size, ordered_devices, validate_waves, wave_members

NS = UUID("12345678-1234-5678-1234-567812345678")


def ids(n: int, start: int = 0) -> list[str]:
    return [str(uuid5(NS, str(i))) for i in range(start, start + n)]


# --- policies ---------------------------------------------------------------------------


def test_no_windows_means_always() -> None:
    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    assert in_maintenance_window(policy=None, now=now)
    assert in_maintenance_window(policy={"maintenance_windows": []}, now=now)


def test_window_in_policy_timezone() -> None:
    # 02:00-04:00 in New York (UTC-5 in January) on Mondays.
    policy = {
        "timezone": "America/New_York",
        "maintenance_windows": [{"days": [0], "start": "02:00", "end": "04:00"}],
    }
    assert in_maintenance_window(policy=policy, now=datetime(2026, 1, 5, 7, 30, tzinfo=UTC))  # Mon 02:30 NY
    assert not in_maintenance_window(
        policy=policy, now=datetime(2026, 1, 5, 2, 30, tzinfo=UTC)
    )  # Sun 21:30 NY
    assert not in_maintenance_window(
        policy=policy, now=datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
    )  # Mon 04:00 NY


def test_window_crossing_midnight_belongs_to_its_start_day() -> None:
    policy = {
        "timezone": "UTC",
        "maintenance_windows": [{"days": [4], "start": "22:00", "end": "02:00"}],
    }  # Friday
    assert in_maintenance_window(policy=policy, now=datetime(2026, 1, 9, 23, 0, tzinfo=UTC))  # Fri 23:00
    assert in_maintenance_window(policy=policy, now=datetime(2026, 1, 10, 1, 59, tzinfo=UTC))  # Sat 01:59
    assert not in_maintenance_window(policy=policy, now=datetime(2026, 1, 10, 2, 0, tzinfo=UTC))  # Sat 02:00
    assert not in_maintenance_window(policy=policy, now=datetime(2026, 1, 9, 1, 0, tzinfo=UTC))  # Fri 01:00
    assert not in_maintenance_window(policy=policy, now=datetime(2026, 1, 10, 23, 0, tzinfo=UTC))  # Sat 23:00


def test_window_across_dst_change_uses_local_time() -> None:
    policy = {
        "timezone": "Europe/Berlin",
        "maintenance_windows": [{"days": [], "start": "03:00", "end": "04:00"}],
    }
    assert in_maintenance_window(policy=policy, now=datetime(2026, 1, 15, 2, 30, tzinfo=UTC))  # CET 03:30
    assert in_maintenance_window(policy=policy, now=datetime(2026, 7, 15, 1, 30, tzinfo=UTC))  # CEST 03:30
    assert not in_maintenance_window(
        policy=policy, now=datetime(2026, 7, 15, 2, 30, tzinfo=UTC)
    )  # CEST 04:30


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError):
        in_maintenance_window(policy={}, now=datetime(2026, 1, 1))


def test_training_allowed() -> None:
    assert training_allowed(policy=None, device_state={}) == (True, "")
    assert training_allowed(policy={"training": {"allowed": False}}, device_state={}) == (
        False,
        "training_disabled",
    )
    rules = {"training": {"allowed": True, "require_charging": True, "require_idle": True}}
    assert training_allowed(policy=rules, device_state={"idle": True}) == (False, "not_charging")
    assert training_allowed(policy=rules, device_state={"charging": True, "idle": False}) == (
        False,
        "not_idle",
    )
    assert training_allowed(policy=rules, device_state={"charging": True, "idle": True}) == (True, "")


# --- waves ------------------------------------------------------------------------------


def test_wave_sizes_are_cumulative_ceilings() -> None:
    assert [cumulative_size(wave={"percent": p}, total=50) for p in (2, 10, 50, 100)] == [1, 5, 25, 50]
    assert cumulative_size(wave={"percent": 1}, total=7) == 1
    assert cumulative_size(wave={"count": 3}, total=2) == 2
    assert cumulative_size(wave={"percent": 50}, total=0) == 0


def test_wave_membership_is_deterministic_nested_and_order_free() -> None:
    devices = ids(50)
    waves = validate_waves(waves=[{"percent": 2}, {"percent": 10}, {"percent": 50}, {"percent": 100}])
    first = [wave_members(rollout_id=7, device_ids=devices, waves=waves, wave_index=i) for i in range(4)]
    shuffled = list(reversed(devices))
    again = [wave_members(rollout_id=7, device_ids=shuffled, waves=waves, wave_index=i) for i in range(4)]
    assert first == again
    for smaller, larger in zip(first, first[1:], strict=False):
        assert set(smaller) <= set(larger)
    assert set(first[-1]) == set(devices)
    # Another rollout orders the fleet differently, so the same boards are not always first.
    assert ordered_devices(rollout_id=8, device_ids=devices) != ordered_devices(
        rollout_id=7, device_ids=devices
    )


def test_late_joiners_slot_into_the_order() -> None:
    devices = ids(40)
    joined = ids(10, start=1000)
    before = ordered_devices(rollout_id=3, device_ids=devices)
    after = ordered_devices(rollout_id=3, device_ids=devices + joined)
    # Existing devices keep their relative order; newcomers are spread through it.
    assert [d for d in after if d in set(devices)] == before
    positions = [after.index(d) for d in joined]
    assert min(positions) < 25 < max(positions)


def test_validate_waves() -> None:
    with pytest.raises(ValueError):
        validate_waves(waves=[])
    with pytest.raises(ValueError):
        validate_waves(waves=[{"percent": 10, "count": 3}])
    with pytest.raises(ValueError):
        validate_waves(waves=[{"percent": 120}])
    assert validate_waves(waves=[{"count": 2, "soak_s": 5}]) == [{"count": 2, "soak_s": 5.0}]


def test_arm_assignment_stable_and_proportional() -> None:
    devices = ids(4000)
    arms = [assign_arm(experiment_id=11, device_id=d, shares=[0.7, 0.3]) for d in devices]
    assert arms == [assign_arm(experiment_id=11, device_id=d, shares=[0.7, 0.3]) for d in devices]
    share_b = Counter(arms)[1] / len(devices)
    # Binomial sd at n=4000, p=0.3 is 0.0072: 4 sd.
    assert abs(share_b - 0.3) < 0.03
    three = Counter(assign_arm(experiment_id=12, device_id=d, shares=[1, 1, 2]) for d in devices)
    assert abs(three[2] / len(devices) - 0.5) < 0.03


# --- gates ------------------------------------------------------------------------------


def fleet_of(n: int, make: Any, *, prefix: str = "d") -> Any:
    """Per-device stats for ``n`` devices, ``make(i)`` giving device i's raw samples."""
    return stats_from_samples({f"{prefix}{i}": make(i) for i in range(n)})


def test_metric_values_are_medians_over_devices() -> None:
    stats = stats_from_samples(
        {
            "a": {
                "latency_ms": np.arange(1, 101, dtype=float),
                "error": np.array([1.0, 1.0, 0.0]),
                "correct": np.array([1.0, 0.0, 1.0, 1.0]),
            },
            "b": {"latency_ms": np.full(40, 10.0), "correct": np.ones(4)},
            "c": {"latency_ms": np.full(40, 20.0), "correct": np.zeros(4)},
        }
    )
    p95 = metric_value(metric="latency_p95_ms", stats=stats, min_samples=1)
    # Device a's own p95 is 95.05; b's 10 and c's 20: the median device is c.
    assert (p95.value, p95.devices, p95.samples) == (20.0, 3, 180)
    rate = metric_value(metric="error_rate", stats=stats, min_samples=1)
    assert rate.value == 0.0 and rate.devices == 3  # a's 2/102 is the one outlier
    assert metric_value(metric="accuracy", stats=stats, min_samples=1).value == 0.75
    # A device with fewer than min_samples samples does not vote.
    few = metric_value(metric="accuracy", stats=stats, min_samples=5)
    assert (few.value, few.devices, few.short) == (None, 0, 3)
    assert metric_value(metric="accuracy", stats={}).value is None


def test_unknown_gate_metric_is_refused() -> None:
    with pytest.raises(KeyError):
        validate_gates(gates=[{"metric": "vibes", "max": 1}])
    with pytest.raises(ValueError):
        validate_gates(gates=[{"metric": "accuracy"}])
    with pytest.raises(ValueError):
        validate_gates(gates=[{"metric": "accuracy", "min": 0.5, "min_devices": 0}])
    (gate,) = validate_gates(gates=[{"metric": "accuracy", "min": 0.5}])
    assert gate["min_samples"] == 30 and gate["min_devices"] == 3


def test_relative_latency_gate() -> None:
    rng = np.random.default_rng(0)
    baseline = fleet_of(10, lambda i: {"latency_ms": rng.normal(10, 1, 200)}, prefix="old")
    slow = fleet_of(5, lambda i: {"latency_ms": rng.normal(16, 1, 200)})
    same = fleet_of(5, lambda i: {"latency_ms": rng.normal(10, 1, 200)})
    gate = {"metric": "latency_p95_ms", "max_increase_pct": 20, "min_samples": 50, "min_devices": 3}
    failed = evaluate_gate(gate=gate, candidate=slow, baseline=baseline)
    assert failed.outcome == "failed" and failed.value is not None and failed.baseline_value is not None
    assert failed.value > failed.baseline_value * 1.2
    assert (failed.devices, failed.baseline_devices, failed.samples) == (5, 10, 1000)
    assert "median of 5 devices" in failed.reason
    assert evaluate_gate(gate=gate, candidate=same, baseline=baseline).outcome == "passed"
    few = fleet_of(5, lambda i: {"latency_ms": rng.normal(16, 1, 10)})
    waiting = evaluate_gate(gate=gate, candidate=few, baseline=baseline)
    assert waiting.outcome == "waiting" and "5 more with fewer samples" in waiting.reason
    two = fleet_of(2, lambda i: {"latency_ms": rng.normal(16, 1, 200)})
    assert evaluate_gate(gate=gate, candidate=two, baseline=baseline).outcome == "waiting"
    assert evaluate_gate(gate=gate, candidate=slow, baseline={}).outcome == "waiting"


def test_absolute_gates_and_combination() -> None:
    candidate = fleet_of(
        4,
        lambda i: {"latency_ms": np.full(100, 5.0), "error": np.full(20, 1.0), "correct": np.full(100, 1.0)},
    )
    gates = [
        {"metric": "accuracy", "min": 0.9, "min_samples": 50},
        {"metric": "error_rate", "max": 0.1, "min_samples": 50},
    ]
    verdict, results = evaluate_gates(gates=gates, candidate=candidate, baseline=None)
    assert verdict == "failed"
    assert [r.outcome for r in results] == ["passed", "failed"]
    assert results[1].value == pytest.approx(20 / 120) and results[1].devices == 4


def test_abs_tolerance_ignores_tiny_relative_changes() -> None:
    baseline = fleet_of(3, lambda i: {"latency_ms": np.full(100, 0.1)}, prefix="old")
    noisy = fleet_of(3, lambda i: {"latency_ms": np.full(100, 0.5)})  # +400%, but 0.4 ms
    slow = fleet_of(3, lambda i: {"latency_ms": np.full(100, 12.0)})
    gate = validate_gates(
        gates=[{"metric": "latency_p95_ms", "max_increase_pct": 50, "abs_tolerance": 3, "min_samples": 10}]
    )[0]
    assert gate["abs_tolerance"] == 3.0
    assert evaluate_gate(gate=gate, candidate=noisy, baseline=baseline).outcome == "passed"
    assert evaluate_gate(gate=gate, candidate=slow, baseline=baseline).outcome == "failed"


# One poisoned device among 20: thousands of extreme samples, all within the metric's range.
POISONS = {
    "latency_p95_ms": {"latency_ms": np.full(5000, 60_000.0)},
    "error_rate": {"latency_ms": np.empty(0), "error": np.ones(5000)},
    "accuracy": {"correct": np.zeros(5000)},
    "mae": {"abs_error": np.full(5000, 1e3)},
}
# And one flattering device: perfect figures on thousands of samples.
FLATTERY = {
    "latency_p95_ms": {"latency_ms": np.full(5000, 0.1)},
    "error_rate": {"latency_ms": np.full(5000, 1.0), "error": np.zeros(5000)},
    "accuracy": {"correct": np.ones(5000)},
    "mae": {"abs_error": np.zeros(5000)},
}
THRESHOLDS: dict[str, dict[str, float]] = {
    "latency_p95_ms": {"max_increase_pct": 20},
    "error_rate": {"max": 0.05},
    "accuracy": {"max_decrease_pct": 5},
    "mae": {"max_increase_pct": 10},
}


def _honest(metric: str, *, bad: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if metric == "latency_p95_ms":
        return {"latency_ms": rng.normal(16.0 if bad else 10.0, 1.0, 60)}
    if metric == "error_rate":
        return {"latency_ms": np.full(60, 8.0), "error": np.ones(12 if bad else 0)}
    if metric == "accuracy":
        return {"correct": (rng.random(60) < (0.7 if bad else 0.92)).astype(float)}
    return {"abs_error": np.abs(rng.normal(0.6 if bad else 0.4, 0.05, 60))}


@pytest.mark.parametrize("metric", list(POISONS))
def test_one_poisoned_device_among_20_can_neither_fail_nor_pass_a_gate(metric: str) -> None:
    rng = np.random.default_rng(7)
    gate = {"metric": metric, **THRESHOLDS[metric], "min_samples": 30, "min_devices": 3}
    baseline = fleet_of(20, lambda i: _honest(metric, bad=False, rng=rng), prefix="old")
    good = {f"d{i}": _honest(metric, bad=False, rng=rng) for i in range(19)}
    bad = {f"d{i}": _honest(metric, bad=True, rng=rng) for i in range(19)}
    assert evaluate_gate(gate=gate, candidate=stats_from_samples(good), baseline=baseline).outcome == "passed"
    assert evaluate_gate(gate=gate, candidate=stats_from_samples(bad), baseline=baseline).outcome == "failed"
    # A good version with one device reporting disaster still passes ...
    poisoned = stats_from_samples({**good, "liar": POISONS[metric]})
    assert evaluate_gate(gate=gate, candidate=poisoned, baseline=baseline).outcome == "passed"
    # ... a bad one with one device reporting perfection still fails ...
    flattered = stats_from_samples({**bad, "liar": FLATTERY[metric]})
    assert evaluate_gate(gate=gate, candidate=flattered, baseline=baseline).outcome == "failed"
    # ... and one baseline device cannot move the reference either way.
    for liar in (POISONS[metric], FLATTERY[metric]):
        moved = stats_from_samples(
            {**{f"old{i}": _honest(metric, bad=False, rng=rng) for i in range(19)}, "x": liar}
        )
        assert (
            evaluate_gate(gate=gate, candidate=stats_from_samples(good), baseline=moved).outcome == "passed"
        )
        assert evaluate_gate(gate=gate, candidate=stats_from_samples(bad), baseline=moved).outcome == "failed"
