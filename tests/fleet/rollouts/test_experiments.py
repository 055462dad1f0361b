"""A/B experiments: stable proportional assignment, guardrails, winner, promotion."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from core.api import ServiceError
from fleet.models import Device, Experiment, ExperimentAssignment, ExperimentDecision, Rollout
from fleet.rollouts.waves import assign_arm
from fleet.services.experiments import (
    experiment_create,
    experiment_evaluate,
    experiment_promote,
    experiment_start,
)
from tests.fleet.rollouts.conftest import add_metrics


def make_experiment(f: Any, **extra: Any) -> Experiment:
    data = {
        "name": "mlp vs cnn",
        "target_group": f.group.pk,
        "arms": [
            {"name": "control", "version_id": f.v1.pk, "share": 0.5},
            {"name": "candidate", "version_id": f.v2.pk, "share": 0.5},
        ],
        "primary_metric": "accuracy",
        "min_samples_per_arm": 300,
        **extra,
    }
    return experiment_create(actor=None, data=data)


def test_assignment_is_stable_and_proportional(fleet: Any) -> None:
    f = fleet(200)
    experiment = make_experiment(
        f,
        arms=[
            {"name": "a", "version_id": f.v1.pk, "share": 0.8},
            {"name": "b", "version_id": f.v2.pk, "share": 0.2},
        ],
    )
    experiment_start(experiment_id=experiment.pk, actor=None)
    rows = list(ExperimentAssignment.objects.filter(experiment=experiment))
    assert len(rows) == 200
    for row in rows:
        assert row.arm == assign_arm(
            experiment_id=experiment.pk, device_id=str(row.device_id), shares=[0.8, 0.2]
        )
        assert Device.objects.get(pk=row.device_id).desired_version_id == row.version_id
    share_b = Counter(r.arm for r in rows)[1] / 200
    assert 0.12 < share_b < 0.28  # 2.8 binomial sd around 0.2
    # Evaluating again assigns nobody twice; late joiners get an arm.
    f.add(5)
    result = experiment_evaluate(experiment_id=experiment.pk)
    assert result["late_joiners"] == 5
    assert ExperimentAssignment.objects.filter(experiment=experiment).count() == 205


def test_shares_must_sum_to_one(fleet: Any) -> None:
    f = fleet(4)
    with pytest.raises(ServiceError):
        make_experiment(
            f,
            arms=[
                {"name": "a", "version_id": f.v1.pk, "share": 0.5},
                {"name": "b", "version_id": f.v2.pk, "share": 0.6},
            ],
        )


def _feed_accuracy(
    experiment: Experiment, f: Any, *, p: dict[int, float], per_device: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    ts = (experiment.started_at or timezone.now()) + timedelta(seconds=1)
    for row in ExperimentAssignment.objects.filter(experiment=experiment).select_related("device"):
        version = f.v1 if row.arm == 0 else f.v2
        add_metrics(
            row.device, version, "correct", (rng.random(per_device) < p[row.arm]).astype(float), ts=ts
        )
        add_metrics(row.device, version, "latency_ms", rng.normal(8, 1, per_device), ts=ts)


def test_winner_declared_with_interval_and_promoted(fleet: Any) -> None:
    f = fleet(40)
    experiment = make_experiment(f)
    experiment_start(experiment_id=experiment.pk, actor=None)
    experiment.refresh_from_db()
    # Not enough samples yet: no decision.
    _feed_accuracy(experiment, f, p={0: 0.75, 1: 0.9}, per_device=5, seed=1)
    result = experiment_evaluate(experiment_id=experiment.pk)
    assert "winner" not in result
    _feed_accuracy(experiment, f, p={0: 0.75, 1: 0.9}, per_device=40, seed=2)
    result = experiment_evaluate(experiment_id=experiment.pk, now=timezone.now() + timedelta(seconds=5))
    winner = result["winner"]
    assert winner["arm"] == 1 and winner["name"] == "candidate"
    assert winner["ci"][0] < winner["effect"] < winner["ci"][1]
    assert winner["ci"][0] > 0 and winner["p_value"] < 0.05
    comparison = result["comparisons"][0]
    assert comparison["fixed_test"]["method"] == "welch_t" and comparison["unit"] == "device"
    experiment.refresh_from_db()
    assert experiment.status == "completed" and experiment.winner_arm == 1
    assert ExperimentDecision.objects.filter(experiment=experiment, action="winner").exists()

    rollout = experiment_promote(experiment_id=experiment.pk, actor=None)
    assert isinstance(rollout, Rollout)
    assert rollout.version_id == f.v2.pk and rollout.target_group_id == f.group.pk
    assert rollout.origin == {"experiment": experiment.pk}
    experiment.refresh_from_db()
    assert experiment.status == "promoted" and experiment.promoted_rollout_id == rollout.pk


def test_guardrail_breach_stops_and_restores(fleet: Any) -> None:
    f = fleet(20)
    experiment = make_experiment(f, guardrails=[{"metric": "error_rate", "max": 0.05, "min_samples": 10}])
    experiment_start(experiment_id=experiment.pk, actor=None)
    experiment.refresh_from_db()
    ts = (experiment.started_at or timezone.now()) + timedelta(seconds=1)
    for row in ExperimentAssignment.objects.filter(experiment=experiment, arm=1).select_related("device"):
        add_metrics(row.device, f.v2, "latency_ms", [5.0] * 10, ts=ts)
        add_metrics(row.device, f.v2, "error", [1.0] * 3, ts=ts)
    experiment_evaluate(experiment_id=experiment.pk, now=timezone.now() + timedelta(seconds=5))
    experiment.refresh_from_db()
    assert experiment.status == "stopped"
    decision = ExperimentDecision.objects.get(experiment=experiment, action="guardrail_breach")
    assert decision.metrics["arm"] == 1 and decision.metrics["value"] == pytest.approx(3 / 13)
    for row in ExperimentAssignment.objects.filter(experiment=experiment, arm=1):
        assert Device.objects.get(pk=row.device_id).desired_version_id == f.v1.pk


def test_regression_experiment_names_the_arm_with_the_lower_mae(fleet: Any) -> None:
    f = fleet(40, regression=True)
    experiment = make_experiment(f, primary_metric=None, min_samples_per_arm=200, effect_scale=0.1)
    assert experiment.primary_metric == "mae"  # the family's primary metric by default
    experiment_start(experiment_id=experiment.pk, actor=None)
    experiment.refresh_from_db()
    rng = np.random.default_rng(4)
    ts = (experiment.started_at or timezone.now()) + timedelta(seconds=1)
    for row in ExperimentAssignment.objects.filter(experiment=experiment).select_related("device"):
        version, centre = (f.v1, 0.5) if row.arm == 0 else (f.v2, 0.4)
        add_metrics(row.device, version, "abs_error", np.abs(rng.normal(centre, 0.1, 40)), ts=ts)
    result = experiment_evaluate(experiment_id=experiment.pk, now=timezone.now() + timedelta(seconds=5))
    assert result["primary_metric"] == "mae"
    winner = result["winner"]
    assert winner["arm"] == 1 and winner["name"] == "candidate"
    assert winner["effect"] < 0 and winner["ci"][1] < 0  # lower error is better
    assert "mean absolute error" in winner["summary"]
    comparison = result["comparisons"][0]
    assert comparison["direction"] == "better" and comparison["fixed_test"]["method"] == "welch_t"
    arms = {a["arm"]: a for a in result["arms"]}
    assert arms[0]["mean"] == pytest.approx(0.5, abs=0.03) and arms[1]["mean"] == pytest.approx(0.4, abs=0.03)


@pytest.mark.parametrize(
    ("regression", "metric", "fits"),
    [(True, "accuracy", ["mae", "latency"]), (False, "mae", ["accuracy", "latency"])],
)
def test_primary_metric_of_the_other_task_is_refused(
    fleet: Any, regression: bool, metric: str, fits: list[str]
) -> None:
    f = fleet(4, regression=regression)
    with pytest.raises(ServiceError) as err:
        make_experiment(f, primary_metric=metric)
    assert err.value.code == "metric_not_for_task"
    assert err.value.details == {
        "task": "regression" if regression else "classification",
        "metric": metric,
        "fits": fits,
    }
    assert make_experiment(f, primary_metric="latency").primary_metric == "latency"


def test_guardrail_of_the_other_task_is_refused(fleet: Any) -> None:
    f = fleet(4, regression=True)
    with pytest.raises(ServiceError) as err:
        make_experiment(f, primary_metric="mae", guardrails=[{"metric": "accuracy", "min": 0.5}])
    assert err.value.code == "gate_not_for_task"


def test_arms_must_be_of_one_family(fleet: Any, make_regression_version: Any) -> None:
    f = fleet(4)
    other = make_regression_version()
    with pytest.raises(ServiceError) as err:
        make_experiment(
            f,
            arms=[
                {"name": "a", "version_id": f.v1.pk, "share": 0.5},
                {"name": "b", "version_id": other.pk, "share": 0.5},
            ],
        )
    assert err.value.code == "mixed_families"
    assert err.value.details == {"families": sorted([f.v1.family.name, other.family.name])}


def test_a_stop_sends_devices_back_with_rollback_deployments(fleet: Any) -> None:
    from fleet.models import Deployment
    from fleet.services.experiments import experiment_stop
    from tests.fleet.rollouts.conftest import report

    f = fleet(10)
    experiment = make_experiment(f)
    experiment_start(experiment_id=experiment.pk, actor=None)
    candidates = list(
        ExperimentAssignment.objects.filter(experiment=experiment, arm=1).select_related("device")
    )
    assert candidates
    assert not Deployment.objects.filter(rollback=True).exists()  # arms are not rollbacks
    for row in candidates:
        report(row.device, "active")  # the candidate is running
    experiment_stop(experiment_id=experiment.pk, actor=None, reason="enough")
    for row in candidates:
        back = Deployment.objects.get(device_id=row.device_id, version=f.v1, state="pending")
        assert back.rollback and back.origin_type == "experiment"
