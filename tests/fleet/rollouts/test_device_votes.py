"""Decisions count devices, not samples: one device among 20, however much it reports, can
neither trigger nor block a rollback, cannot move a rollout's baseline from outside the
rollout, and cannot make an A/A experiment declare a winner or trip a guardrail."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.models import Device, ExperimentAssignment, MetricSample, Rollout, RolloutDecision, RolloutDevice
from fleet.rollouts.stats import msprt_samples
from fleet.selectors.rollouts import device_metric_stats
from fleet.services.experiments import experiment_create, experiment_evaluate, experiment_start
from fleet.services.rollouts import rollout_advance, rollout_create, rollout_start
from tests.fleet.rollouts.conftest import add_metrics, report

WAVES = [{"percent": 50, "soak_s": 60}, {"percent": 100, "soak_s": 0}]
GATES = [
    {"metric": "error_rate", "max": 0.05, "min_samples": 50},
    {"metric": "latency_p95_ms", "max_increase_pct": 20, "abs_tolerance": 1, "min_samples": 50},
    {"metric": "accuracy", "max_decrease_pct": 5, "min_samples": 50},
]


def _start(f: Any) -> tuple[Rollout, Any, set[Any]]:
    rollout = rollout_create(
        actor=None,
        data={
            "version": f.v2.pk,
            "target_group": f.group.pk,
            "waves": WAVES,
            "gates": GATES,
            "on_gate_failure": "rollback",
        },
    )
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    exposed = set()
    for member in RolloutDevice.objects.filter(rollout=rollout, state="in_progress").select_related("device"):
        report(member.device, "downloading")
        report(member.device, "active")
        exposed.add(member.device_id)
    return rollout, t0, exposed


def _honest(device: Any, version: Any, *, bad: bool, ts: Any, rng: np.random.Generator) -> None:
    n = 80
    add_metrics(device, version, "latency_ms", rng.normal(16.0 if bad else 10.0, 0.5, n), ts=ts)
    add_metrics(device, version, "error", np.ones(20 if bad else 1), ts=ts)
    accuracy = 0.7 if bad else 0.92
    add_metrics(device, version, "correct", (rng.random(n) < accuracy).astype(float), ts=ts)


def _pooled_error_rate(version: Any) -> float:
    errors = MetricSample.objects.filter(version=version, name="error").count()
    served = MetricSample.objects.filter(version=version, name="latency_ms").count()
    return errors / (errors + served)


def test_one_device_reporting_disaster_cannot_roll_back_a_good_version(fleet: Any) -> None:
    f = fleet(20)
    rollout, t0, exposed = _start(f)
    rng = np.random.default_rng(11)
    ts = t0 + timedelta(seconds=5)
    for device in f.devices:
        _honest(device, f.v2 if device.pk in exposed else f.v1, bad=False, ts=ts, rng=rng)
    liar = next(d for d in f.devices if d.pk in exposed)
    add_metrics(liar, f.v2, "error", np.ones(3000), ts=ts)
    add_metrics(liar, f.v2, "latency_ms", np.full(3000, 60_000.0), ts=ts)
    add_metrics(liar, f.v2, "correct", np.zeros(3000), ts=ts)
    # Pooled, the liar's samples are most of the evidence: a per-sample gate would fire.
    assert _pooled_error_rate(f.v2) > 0.4
    assert rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=20)).action == "waiting"
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=61))
    assert result.action == "wave_passed"
    gates = {g["metric"]: g for g in result.stats["gates"]}
    assert all(g["outcome"] == "passed" for g in gates.values())
    assert gates["error_rate"]["devices"] == 10 and gates["latency_p95_ms"]["baseline_devices"] == 10
    assert gates["latency_p95_ms"]["value"] < 12


def test_one_device_reporting_perfection_cannot_save_a_bad_version(fleet: Any) -> None:
    f = fleet(20)
    rollout, t0, exposed = _start(f)
    rng = np.random.default_rng(12)
    ts = t0 + timedelta(seconds=5)
    for device in f.devices:
        _honest(device, f.v2 if device.pk in exposed else f.v1, bad=device.pk in exposed, ts=ts, rng=rng)
    liar = next(d for d in f.devices if d.pk in exposed)
    add_metrics(liar, f.v2, "latency_ms", np.full(5000, 1.0), ts=ts)
    add_metrics(liar, f.v2, "correct", np.ones(5000), ts=ts)
    assert _pooled_error_rate(f.v2) < 0.05  # pooled, the bad version would look fine
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=20))
    assert result.action == "rolled_back"
    failed = {g["metric"] for g in result.stats["gates"] if g["outcome"] == "failed"}
    assert failed == {"error_rate", "latency_p95_ms", "accuracy"}
    decision = RolloutDecision.objects.get(rollout=rollout, action="rolled_back")
    assert "median of 10 devices" in decision.reason
    for device_id in exposed:
        assert Device.objects.get(pk=device_id).desired_version_id == f.v1.pk


def test_a_device_outside_the_rollout_cannot_move_its_baseline(fleet: Any) -> None:
    f = fleet(20)
    (outsider,) = f.add(1, prefix="elsewhere", in_group=False)
    rollout, t0, exposed = _start(f)
    rng = np.random.default_rng(13)
    ts = t0 + timedelta(seconds=5)
    for device in f.devices:
        if device.pk == outsider.pk:
            continue
        _honest(device, f.v2 if device.pk in exposed else f.v1, bad=False, ts=ts, rng=rng)
    for device_id in exposed:  # the new version is 50 % slower, nothing else
        add_metrics(Device.objects.get(pk=device_id), f.v2, "latency_ms", np.full(200, 15.0), ts=ts)
    # Slow figures for the replaced version from a device the rollout does not target
    # would make the new version look no slower than the old.
    add_metrics(outsider, f.v1, "latency_ms", np.full(5000, 40.0), ts=ts)
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=20))
    assert result.action == "rolled_back"
    latency = next(g for g in result.stats["gates"] if g["metric"] == "latency_p95_ms")
    assert latency["outcome"] == "failed" and latency["baseline_devices"] == 10
    assert latency["baseline_value"] == pytest.approx(10.8, abs=0.5)


def test_the_last_wave_is_judged_against_its_own_devices_before_they_switched(fleet: Any) -> None:
    f = fleet(10)
    rollout = rollout_create(
        actor=None,
        data={
            "version": f.v2.pk,
            "target_group": f.group.pk,
            "waves": [{"percent": 100, "soak_s": 60}],
            "gates": [GATES[1]],
        },
    )
    t0 = timezone.now()
    rng = np.random.default_rng(14)
    for device in f.devices:  # the version they ran during the minute before the rollout
        add_metrics(device, f.v1, "latency_ms", rng.normal(10, 0.5, 60), ts=t0 - timedelta(seconds=30))
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    for device in f.devices:
        report(device, "active")
        add_metrics(device, f.v2, "latency_ms", rng.normal(10, 0.5, 60), ts=t0 + timedelta(seconds=5))
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=61))
    assert result.action == "succeeded"
    (gate,) = result.stats["gates"]
    assert gate["outcome"] == "passed" and gate["baseline_devices"] == 10


def test_per_device_figures_take_a_fixed_number_of_queries(fleet: Any) -> None:
    f = fleet(50)
    t0 = timezone.now()
    for device in f.devices:
        add_metrics(device, f.v1, "latency_ms", np.arange(40.0), ts=t0)
        add_metrics(device, f.v1, "error", [1.0], ts=t0)
    counts = []
    for n in (5, 50):
        with CaptureQueriesContext(connection) as queries:
            stats = device_metric_stats(
                version_ids=[f.v1.pk],
                since=t0 - timedelta(seconds=1),
                until=t0 + timedelta(seconds=1),
                devices=Device.objects.filter(pk__in=[d.pk for d in f.devices[:n]]).values("pk"),
                names=["latency_ms", "error"],
                p95_of=["latency_ms"],
            )
        counts.append(len(queries))
        assert len(stats) == n
        summary = stats[str(f.devices[0].pk)]["latency_ms"]
        assert (summary.n, summary.total) == (40, float(np.arange(40.0).sum()))
        assert summary.p95 == pytest.approx(np.percentile(np.arange(40.0), 95))
        assert stats[str(f.devices[0].pk)]["error"].p95 is None
    assert counts[0] == counts[1] <= 2


# --- experiments ----------------------------------------------------------------------------


def _aa_experiment(f: Any, **extra: Any) -> Any:
    experiment = experiment_create(
        actor=None,
        data={
            "name": "a/a",
            "target_group": f.group.pk,
            "arms": [
                {"name": "control", "version_id": f.v1.pk, "share": 0.5},
                {"name": "candidate", "version_id": f.v2.pk, "share": 0.5},
            ],
            "primary_metric": "accuracy",
            **extra,
        },
    )
    experiment_start(experiment_id=experiment.pk, actor=None)
    experiment.refresh_from_db()
    return experiment


def test_a_heterogeneous_aa_experiment_declares_no_winner(fleet: Any) -> None:
    """Both arms are equally good; devices differ a lot and some report 50x more than others."""
    f = fleet(40)
    experiment = _aa_experiment(f)
    rng = np.random.default_rng(20261202)
    rows = list(ExperimentAssignment.objects.filter(experiment=experiment).select_related("device"))
    accuracy = {row.device_id: float(np.clip(rng.normal(0.8, 0.12), 0.05, 0.99)) for row in rows}
    rate = {row.device_id: int(rng.choice([20, 40, 1000])) for row in rows}
    pooled: dict[int, list[np.ndarray]] = {0: [], 1: []}
    start = experiment.started_at or timezone.now()
    for look in range(1, 6):
        ts = start + timedelta(seconds=look)
        for row in rows:
            values = (rng.random(rate[row.device_id]) < accuracy[row.device_id]).astype(float)
            add_metrics(row.device, f.v1 if row.arm == 0 else f.v2, "correct", values, ts=ts)
            pooled[row.arm].append(values)
        result = experiment_evaluate(experiment_id=experiment.pk, now=ts + timedelta(milliseconds=900))
        assert "winner" not in result, result
    (comparison,) = result["comparisons"]
    assert comparison["unit"] == "device" and comparison["n_control"] + comparison["n_arm"] == 40
    assert comparison["always_valid_p"] > experiment.alpha
    # The same data analysed sample by sample would have declared a winner.
    per_sample = msprt_samples(a=np.concatenate(pooled[0]), b=np.concatenate(pooled[1]), tau=0.05)
    assert per_sample.p_value < experiment.alpha
    experiment.refresh_from_db()
    assert experiment.status == "running"


def test_one_device_cannot_trip_a_guardrail(fleet: Any) -> None:
    f = fleet(20)
    experiment = _aa_experiment(f, guardrails=[{"metric": "error_rate", "max": 0.05, "min_samples": 20}])
    ts = (experiment.started_at or timezone.now()) + timedelta(seconds=1)
    rows = list(ExperimentAssignment.objects.filter(experiment=experiment).select_related("device"))
    for row in rows:
        add_metrics(row.device, f.v1 if row.arm == 0 else f.v2, "latency_ms", np.full(40, 8.0), ts=ts)
    liar = next(row for row in rows if row.arm == 1)
    add_metrics(liar.device, f.v2, "error", np.ones(5000), ts=ts)
    experiment_evaluate(experiment_id=experiment.pk, now=ts + timedelta(seconds=1))
    experiment.refresh_from_db()
    assert experiment.status == "running"
    # Every device of the arm failing is what a guardrail is for.
    for row in rows:
        if row.arm == 1:
            add_metrics(row.device, f.v2, "error", np.ones(10), ts=ts)
    experiment_evaluate(experiment_id=experiment.pk, now=ts + timedelta(seconds=2))
    experiment.refresh_from_db()
    assert experiment.status == "stopped"
