"""Waves judged against a control cohort: pure rules (seeded split, robust mSPRT, an A/A
simulation of repeated looks) and the rollout engine with control devices on the incumbent."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from core.api import ServiceError
from fleet.models import Deployment, Device, Rollout, RolloutDecision, RolloutDevice
from fleet.rollouts.control import (
    aa_false_positive_rate,
    choose_control,
    judge_values,
    split_control,
    validate_control_gates,
)
from fleet.services.control import control_ids
from fleet.services.rollouts import (
    rollout_advance,
    rollout_create,
    rollout_rollback,
    rollout_start,
    running_rollout_ids,
)
from tests.fleet.rollouts.conftest import add_metrics, report

WAVES = [{"percent": 25, "soak_s": 60}, {"percent": 100, "soak_s": 0}]
GATE = validate_control_gates(gates=[{"metric": "accuracy", "min_samples": 1}])[0]


# -- pure ---------------------------------------------------------------------------------


def test_control_cohort_is_seeded_stable_and_of_the_share() -> None:
    ids = [f"dev-{i}" for i in range(200)]
    treated, control = split_control(rollout_id=7, device_ids=ids, percent=20)
    assert len(control) == 40 and len(treated) == 160
    assert set(treated) | set(control) == set(ids) and not set(treated) & set(control)
    # The same rollout draws the same cohort whatever the order of the target.
    assert sorted(choose_control(rollout_id=7, device_ids=ids[::-1], percent=20)) == sorted(control)
    assert len(choose_control(rollout_id=7, device_ids=ids[:30], percent=20)) == 6
    # Another rollout draws another cohort; a share of 0 draws none.
    assert split_control(rollout_id=8, device_ids=ids, percent=20)[1] != control
    assert choose_control(rollout_id=7, device_ids=ids, percent=0) == []


def test_good_candidate_passes_and_a_clearly_worse_one_fails() -> None:
    rng = np.random.default_rng(4)
    control = list(0.92 + rng.normal(0, 0.02, 10))
    good = list(0.925 + rng.normal(0, 0.02, 8))
    bad = list(0.80 + rng.normal(0, 0.02, 8))
    assert judge_values(gate=GATE, candidate=good, control=control).outcome == "passed"
    result = judge_values(gate=GATE, candidate=bad, control=control)
    assert result.outcome == "failed"
    assert result.ci_high is not None and result.ci_high < 0
    assert result.candidate.devices == 8 and result.control.devices == 10
    assert "control" in result.reason


def test_one_poisoned_device_cannot_decide() -> None:
    rng = np.random.default_rng(5)
    control = list(0.92 + rng.normal(0, 0.02, 10))
    good = list(0.92 + rng.normal(0, 0.02, 8))
    # A good candidate with one device reporting nothing but wrong answers still passes...
    assert judge_values(gate=GATE, candidate=[*good[:-1], 0.0], control=control).outcome == "passed"
    # ...and a poisoned control device cannot make it look worse either.
    assert judge_values(gate=GATE, candidate=good, control=[*control[:-1], 1.0]).outcome == "passed"
    # A bad candidate with one device claiming perfect answers is still stopped.
    bad = list(0.80 + rng.normal(0, 0.02, 8))
    assert judge_values(gate=GATE, candidate=[*bad[:-1], 1.0], control=control).outcome == "failed"


def test_waiting_until_both_sides_have_min_devices() -> None:
    result = judge_values(gate=GATE, candidate=[0.9] * 8, control=[0.9] * 4)
    assert result.outcome == "waiting" and "control 4 of 5" in result.reason


def test_repeated_looks_on_an_aa_keep_the_false_positive_rate_near_alpha() -> None:
    # 300 A/A rollouts, each judged at 15 looks as samples arrive (the engine judges on every
    # tick): the share ever failed stays at or below alpha (0.05), with a little slack for
    # the simulation's own noise, also with few devices per side.
    for devices in (5, 12):
        rate = aa_false_positive_rate(
            runs=300, looks=15, devices_per_side=devices, samples_per_look=30, seed=11
        )
        assert rate <= 0.07, (devices, rate)


# -- on the rows --------------------------------------------------------------------------


def _create(f: Any, **extra: Any) -> Rollout:
    data = {
        "version": f.v2.pk,
        "target_group": f.group.pk,
        "waves": WAVES,
        "control_percent": 25,
        "control_gates": [{"metric": "accuracy", "min_samples": 40}],
        **extra,
    }
    return rollout_create(actor=None, data=data)


def _activate(rollout: Rollout) -> set[Any]:
    exposed = set()
    for m in RolloutDevice.objects.filter(rollout=rollout, state="in_progress").select_related("device"):
        report(m.device, "downloading")
        report(m.device, "active")
        exposed.add(m.device_id)
    return exposed


def _feed(f: Any, rollout: Rollout, *, candidate_accuracy: float, ts: Any, seed: int) -> None:
    rng = np.random.default_rng(seed)
    control = {str(d) for d in control_ids(rollout=rollout)}
    members = {
        str(d) for d in RolloutDevice.objects.filter(rollout=rollout).values_list("device_id", flat=True)
    }
    for d in f.devices:
        if str(d.pk) in members:
            add_metrics(d, f.v2, "correct", (rng.random(60) < candidate_accuracy).astype(float), ts=ts)
        elif str(d.pk) in control:
            add_metrics(d, f.v1, "correct", (rng.random(60) < 0.92).astype(float), ts=ts)


def test_control_devices_stay_on_the_incumbent_and_a_good_candidate_passes(fleet: Any) -> None:
    f = fleet(40)
    rollout = _create(f)
    control = control_ids(rollout=rollout)
    assert len(control) >= 5
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    _activate(rollout)
    members = {
        str(d) for d in RolloutDevice.objects.filter(rollout=rollout).values_list("device_id", flat=True)
    }
    assert not members & set(control)
    # Before enough samples the gate waits, even after the soak.
    waiting = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=61))
    assert waiting.action == "waiting_for_samples"
    assert waiting.stats["control"]["gates"][0]["outcome"] == "waiting"
    _feed(f, rollout, candidate_accuracy=0.93, ts=t0 + timedelta(seconds=62), seed=1)
    passed = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=63))
    assert passed.action == "wave_passed", passed.stats.get("control")
    decision = RolloutDecision.objects.get(rollout=rollout, action="wave_passed")
    (gate,) = decision.metrics["control"]["gates"]
    assert gate["outcome"] == "passed"
    assert gate["candidate"]["devices"] >= 5 and gate["control"]["devices"] == len(control)
    assert gate["control"]["samples"] == 60 * len(control)
    # Every other device joins the last wave; the control cohort still runs v1.
    _activate(rollout)
    assert all(Device.objects.get(pk=d).running_version_id == f.v1.pk for d in control)
    # The last wave is judged on its own window too.
    _feed(f, rollout, candidate_accuracy=0.93, ts=t0 + timedelta(seconds=65), seed=3)
    done = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=70))
    assert done.action == "succeeded"
    succeeded = RolloutDecision.objects.get(rollout=rollout, action="succeeded")
    assert succeeded.metrics["control_released"] == len(control)
    # At the end the control devices get the version too, as members a rollback covers.
    for device_id in control:
        device = Device.objects.get(pk=device_id)
        assert device.desired_version_id == f.v2.pk
        assert Deployment.objects.filter(device=device, version=f.v2, origin_type="rollout").exists()
    # The tick follows their installs to the end, so none stays in progress for ever.
    assert rollout.pk in running_rollout_ids()
    _activate(rollout)
    settled = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=75))
    assert settled.action == "settling" and settled.stats["succeeded"] == len(control)
    assert not RolloutDevice.objects.filter(rollout=rollout, state__in=["queued", "in_progress"]).exists()
    assert rollout.pk not in running_rollout_ids()
    rollout_rollback(rollout_id=rollout.pk, actor=None)
    assert all(Device.objects.get(pk=d).desired_version_id == f.v1.pk for d in control)


def test_a_clearly_worse_candidate_fails_in_the_first_wave(fleet: Any) -> None:
    f = fleet(40)
    rollout = _create(f, on_gate_failure="rollback")
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    exposed = _activate(rollout)
    _feed(f, rollout, candidate_accuracy=0.70, ts=t0 + timedelta(seconds=5), seed=2)
    # Judged before the soak ends: the evidence is there, so the wave stops at once.
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=10))
    assert result.action == "rolled_back"
    rollout.refresh_from_db()
    assert rollout.current_wave == 0 and "control cohort" in rollout.status_reason
    decision = RolloutDecision.objects.get(rollout=rollout, action="rolled_back")
    (gate,) = decision.metrics["control"]["gates"]
    assert gate["outcome"] == "failed"
    assert gate["candidate"]["mean"] < gate["control"]["mean"] - 0.1
    assert gate["candidate"]["devices"] == len(exposed)
    assert decision.metrics["rolled_back_devices"] == len(exposed)


def test_control_cohort_too_small_is_refused_with_the_minimum(fleet: Any) -> None:
    f = fleet(12)
    with pytest.raises(ServiceError) as err:
        _create(f, control_percent=10)
    assert err.value.code == "control_too_small" and err.value.status_code == 400
    assert err.value.details["minimum"] == 5
    assert err.value.details["control_devices"] < 5
    assert not Rollout.objects.exists()


def test_bad_control_settings_are_400(fleet: Any) -> None:
    f = fleet(20)
    for extra, code in (
        ({"control_percent": 80}, "validation_error"),
        ({"control_gates": [{"metric": "happiness"}]}, "unknown_metric"),
        ({"control_gates": [{"metric": "accuracy", "min_devices": 1}]}, "validation_error"),
        ({"waves": [{"count": 3, "soak_s": 0}, {"percent": 100}]}, "first_wave_too_small"),
    ):
        with pytest.raises(ServiceError) as err:
            _create(f, **extra)
        assert err.value.code == code, extra
