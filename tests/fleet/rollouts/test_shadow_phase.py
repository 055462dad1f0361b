"""A rollout's shadow phase: its policy, the verdict on per-device figures, the first wave
opening when the candidate passes, the rollout failing (and the family policy acting) when
it does not, and the ways out of the phase."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from core.events import subscribed
from fleet.models import Device, FamilyPolicy, Rollout, RolloutDevice, Shadow, VersionDecision
from fleet.rollouts.shadow_gate import judge_shadow, validate_shadow_policy
from fleet.services.devices import device_assign_version
from fleet.services.rollouts import rollout_abort, rollout_advance, rollout_create, rollout_start
from tests.fleet.rollouts.conftest import add_metrics, wait_past

ONE_WAVE = [{"percent": 100, "soak_s": 0}]
POLICY = {"min_devices": 3, "min_samples": 10, "max_drop": 0.02}


def _row(accuracy: float | None, active: float | None, n: int = 20, **extra: Any) -> dict[str, Any]:
    return {
        "accuracy": accuracy,
        "accuracy_samples": n if accuracy is not None else 0,
        "active_accuracy": active,
        "active_accuracy_samples": n if active is not None else 0,
        **extra,
    }


def _shadow(rollout: Rollout) -> Shadow:
    assert rollout.shadow_id is not None
    return Shadow.objects.get(pk=rollout.shadow_id)


def _policy(**overrides: Any) -> dict[str, Any]:
    return validate_shadow_policy({**POLICY, **overrides})


# ------------------------------------------------------------------ the verdict (pure)


def test_the_median_of_paired_differences_decides_once_enough_devices_vote() -> None:
    good = [_row(0.9, 0.88), _row(0.91, 0.9), _row(0.8, 0.81)]
    assert judge_shadow(rows=good, policy=_policy(), task="classification", elapsed_s=5).outcome == "passed"
    bad = [_row(0.7, 0.9), _row(0.72, 0.9), _row(0.91, 0.9)]
    verdict = judge_shadow(rows=bad, policy=_policy(), task="classification", elapsed_s=5)
    assert verdict.outcome == "failed" and "accuracy" in verdict.reason
    assert verdict.numbers["voting_devices"] == 3 and verdict.numbers["median_difference"] == pytest.approx(
        -0.18
    )
    # Two votes are not enough, and a device below min_samples does not vote.
    few = [_row(0.1, 0.9), _row(0.1, 0.9), _row(0.1, 0.9, n=9)]
    assert judge_shadow(rows=few, policy=_policy(), task="classification", elapsed_s=5).outcome == "waiting"


def test_one_device_cannot_decide_for_the_fleet() -> None:
    rows = [_row(0.9, 0.9), _row(0.9, 0.9), _row(0.0, 1.0), _row(0.91, 0.9), _row(0.9, 0.89)]
    assert judge_shadow(rows=rows, policy=_policy(), task="classification", elapsed_s=5).outcome == "passed"
    rows = [_row(0.5, 0.9), _row(0.5, 0.9), _row(1.0, 0.0), _row(0.5, 0.9), _row(0.55, 0.9)]
    assert judge_shadow(rows=rows, policy=_policy(), task="classification", elapsed_s=5).outcome == "failed"


def test_regression_judges_the_relative_rise_of_mae() -> None:
    def mae(candidate: float, active: float) -> dict[str, Any]:
        return {"mae": candidate, "mae_samples": 20, "active_mae": active, "active_mae_samples": 20}

    policy = _policy(max_drop=0.1)
    ok = [mae(1.05, 1.0), mae(2.0, 2.0), mae(0.5, 0.6)]
    assert judge_shadow(rows=ok, policy=policy, task="regression", elapsed_s=1).outcome == "passed"
    worse = [mae(1.3, 1.0), mae(2.5, 2.0), mae(0.5, 0.6)]
    assert judge_shadow(rows=worse, policy=policy, task="regression", elapsed_s=1).outcome == "failed"


def test_agreement_fails_a_candidate_and_alone_judges_a_fleet_without_feedback() -> None:
    policy = _policy(min_agreement=0.8)

    def agreeing(value: float, labelled: bool) -> dict[str, Any]:
        row = _row(0.9, 0.9) if labelled else _row(None, None)
        return {**row, "agreement": value, "agreement_samples": 50}

    low = [agreeing(0.5, True), agreeing(0.6, True), agreeing(0.95, True)]
    assert judge_shadow(rows=low, policy=policy, task="classification", elapsed_s=1).outcome == "failed"
    unlabelled = [agreeing(0.9, False) for _ in range(3)]
    verdict = judge_shadow(rows=unlabelled, policy=policy, task="classification", elapsed_s=1)
    assert verdict.outcome == "passed" and "agreement" in verdict.reason
    # Without min_agreement, a fleet that sends no feedback waits, then times out.
    waiting = judge_shadow(rows=unlabelled, policy=_policy(), task="classification", elapsed_s=1)
    assert waiting.outcome == "waiting"
    late = judge_shadow(rows=unlabelled, policy=_policy(timeout_s=60), task="classification", elapsed_s=61)
    assert late.outcome == "timed_out"


@pytest.mark.parametrize(
    "value",
    [
        "yes",
        [1],
        {"sample_rate": 0},
        {"sample_rate": 1.5},
        {"max_drop": float("nan")},
        {"min_devices": 0},
        {"timeout_s": True},
        {"on_timeout": "maybe"},
        {"nonsense": 1},
        {"min_agreement": "high"},
    ],
)
def test_bad_policies_are_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="shadow"):
        validate_shadow_policy(value)


def test_policy_defaults_and_none() -> None:
    assert validate_shadow_policy(None) == {} and validate_shadow_policy(False) == {}
    assert validate_shadow_policy(True) == validate_shadow_policy({})
    assert (
        validate_shadow_policy({})["min_devices"] == 3
        and validate_shadow_policy({})["on_timeout"] == "continue"
    )


# ------------------------------------------------------------------ through the rollout engine


def _start(f: Any, **shadow: Any) -> tuple[Rollout, Any]:
    rollout = rollout_create(
        actor=None,
        data={
            "version": f.v2.pk,
            "target_group": f.group.pk,
            "waves": ONE_WAVE,
            "shadow": {**POLICY, **shadow},
            "held_back": {str(f.devices[-1].pk): "onnxruntime_too_old"},
        },
    )
    t0 = timezone.now()
    rollout = rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    return rollout, t0


def _shadow_scores(f: Any, devices: list[Any], *, candidate: float, active: float, n: int = 20) -> None:
    now = timezone.now()
    for device in devices:
        add_metrics(
            device,
            f.v2,
            "shadow_correct",
            [1.0] * int(candidate * n) + [0.0] * (n - int(candidate * n)),
            ts=now,
        )
        add_metrics(device, f.v1, "correct", [1.0] * int(active * n) + [0.0] * (n - int(active * n)), ts=now)
    wait_past(now, n)


def test_a_shadow_rollout_runs_the_candidate_in_shadow_then_opens_its_first_wave(
    fleet: Any, django_capture_on_commit_callbacks: Any
) -> None:
    f = fleet(6)
    heard: list[Any] = []
    with subscribed(heard.append, names=["rollout.*"]), django_capture_on_commit_callbacks(execute=True):
        rollout, t0 = _start(f)
    assert rollout.status == Rollout.Status.SHADOW and rollout.current_wave == -1
    shadow = _shadow(rollout)
    members = set(shadow.members.values_list("device_id", flat=True))
    # The held-back board cannot run the candidate, so it does not shadow it either.
    assert members == {d.pk for d in f.devices[:-1]}
    assert not RolloutDevice.objects.filter(rollout=rollout).exists()
    assert all(d.desired_version_id == f.v1.pk for d in Device.objects.filter(pk__in=members))
    assert rollout.decisions.filter(action="shadow_started").exists()

    assert (
        rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=5)).action == "waiting_for_shadow"
    )
    _shadow_scores(f, f.devices[:4], candidate=0.95, active=0.9)
    with subscribed(heard.append, names=["rollout.*"]), django_capture_on_commit_callbacks(execute=True):
        result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=10))
    assert result.action == "shadow_passed"
    rollout.refresh_from_db()
    shadow.refresh_from_db()
    assert rollout.status == Rollout.Status.RUNNING and rollout.current_wave == 0
    assert shadow.status == Shadow.Status.STOPPED
    passed = rollout.decisions.get(action="shadow_passed")
    assert passed.metrics["voting_devices"] == 4 and passed.metrics["median_difference"] == pytest.approx(
        0.05
    )
    assert RolloutDevice.objects.filter(rollout=rollout).count() == 5
    assert "rollout.shadow_passed" in [e.name for e in heard]


def test_a_candidate_worse_in_shadow_fails_before_any_device_serves_it_and_the_policy_reverts(
    fleet: Any, django_capture_on_commit_callbacks: Any
) -> None:
    f = fleet(6)
    FamilyPolicy.objects.create(family=f.v2.family, on_failure=FamilyPolicy.OnFailure.REVERT)
    # One board was given the candidate by hand: the revert takes it back too.
    device_assign_version(actor=None, device_id=f.devices[-1].pk, version_id=f.v2.pk)
    Device.objects.filter(pk=f.devices[-1].pk).update(running_version=f.v2, previous_version=f.v1)
    rollout, t0 = _start(f)
    _shadow_scores(f, f.devices[:4], candidate=0.5, active=0.9)
    heard: list[Any] = []
    with (
        subscribed(heard.append, names=["rollout.*", "version.*"]),
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert (
            rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=10)).action == "shadow_failed"
        )
    rollout.refresh_from_db()
    assert rollout.status == Rollout.Status.FAILED and "shadow" in rollout.status_reason
    assert not RolloutDevice.objects.filter(rollout=rollout).exists()
    assert _shadow(rollout).status == Shadow.Status.STOPPED
    failed = rollout.decisions.get(action="shadow_failed")
    assert failed.metrics["median_difference"] == pytest.approx(-0.4)
    decision = VersionDecision.objects.get(version=f.v2)
    assert (
        decision.trigger == VersionDecision.Trigger.SHADOW
        and decision.action == VersionDecision.Action.REVERTED
    )
    assert decision.metrics["median_difference"] == pytest.approx(-0.4) and decision.devices_reverted == 1
    assert Device.objects.get(pk=f.devices[-1].pk).desired_version_id == f.v1.pk
    assert {"rollout.shadow_failed", "version.reverted"} <= {e.name for e in heard}
    # Judged once: a later tick changes nothing.
    assert rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=20)).action == "not_running"


def test_no_verdict_by_the_timeout_opens_the_waves_by_default(fleet: Any) -> None:
    f = fleet(6)
    rollout, t0 = _start(f, timeout_s=60)
    assert (
        rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=30)).action == "waiting_for_shadow"
    )
    assert (
        rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=61)).action == "shadow_inconclusive"
    )
    rollout.refresh_from_db()
    assert rollout.status == Rollout.Status.RUNNING and rollout.current_wave == 0


def test_no_verdict_by_the_timeout_stops_the_rollout_when_the_policy_says_so(fleet: Any) -> None:
    f = fleet(4)
    rollout, t0 = _start(f, timeout_s=60, on_timeout="stop")
    assert rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=61)).action == "aborted"
    rollout.refresh_from_db()
    assert (
        rollout.status == Rollout.Status.ABORTED
        and not RolloutDevice.objects.filter(rollout=rollout).exists()
    )
    assert _shadow(rollout).status == Shadow.Status.STOPPED


def test_aborting_in_shadow_stops_the_shadow_and_a_stopped_shadow_stops_the_rollout(fleet: Any) -> None:
    from fleet.services.shadows import shadow_stop

    f = fleet(5)
    rollout, _ = _start(f)
    rollout_abort(rollout_id=rollout.pk, actor=None, reason="not today")
    assert _shadow(rollout).status == Shadow.Status.STOPPED

    again, t0 = _start(f)
    shadow_stop(actor=None, shadow_id=_shadow(again).pk, reason="operator stopped it")
    assert rollout_advance(rollout_id=again.pk, now=t0 + timedelta(seconds=1)).action == "aborted"
    again.refresh_from_db()
    assert again.status == Rollout.Status.ABORTED and "stopped" in again.status_reason


def test_the_api_takes_a_shadow_policy_and_refuses_a_bad_one(fleet: Any, operator_client: Any) -> None:
    f = fleet(5)
    body = {"version": f.v2.pk, "target_group": f.group.pk, "waves": ONE_WAVE}
    bad = operator_client.post("/api/v1/rollouts/", {**body, "shadow": {"sample_rate": 2}}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "validation_error"
    assert "shadow" in bad.json()["error"]["message"]
    created = operator_client.post("/api/v1/rollouts/", {**body, "shadow": {"min_devices": 4}}, format="json")
    assert created.status_code == 201, created.content
    assert created.json()["shadow_policy"]["min_devices"] == 4
    started = operator_client.post(f"/api/v1/rollouts/{created.json()['id']}/start/", {}, format="json")
    assert started.status_code == 200 and started.json()["status"] == "shadow"
    assert started.json()["shadow"] == Shadow.objects.get().pk
