"""Rollout service: validation, waves, faults (offline, duplicates, abort, gates), late joiners."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from core.api import ConflictError, ServiceError
from fleet.models import Deployment, Device, Rollout, RolloutDecision, RolloutDevice
from fleet.rollouts.waves import wave_members
from fleet.services.rollouts import (
    rollout_abort,
    rollout_advance,
    rollout_create,
    rollout_resume,
    rollout_start,
)
from tests.fleet.rollouts.conftest import add_metrics, report

WAVES = [{"percent": 10, "soak_s": 60}, {"percent": 50, "soak_s": 60}, {"percent": 100, "soak_s": 0}]


def create(f: Any, **extra: Any) -> Rollout:
    data = {"version": f.v2.pk, "target_group": f.group.pk, "waves": WAVES, **extra}
    return rollout_create(actor=None, data=data)


def members(rollout: Rollout, state: str | None = None) -> list[RolloutDevice]:
    qs = RolloutDevice.objects.filter(rollout=rollout).select_related("device")
    return list(qs.filter(state=state) if state else qs)


def activate_all_in_progress(rollout: Rollout) -> None:
    for m in members(rollout, "in_progress"):
        report(m.device, "downloading")
        report(m.device, "active")


def test_empty_target_refused(fleet: Any) -> None:
    f = fleet(3)
    with pytest.raises(ServiceError) as err:
        rollout_create(
            actor=None, data={"version": f.v2.pk, "target_tags": ["nobody-has-this"], "waves": WAVES}
        )
    assert err.value.code == "empty_target"


def test_version_without_onnx_refused(fleet: Any, make_version: Any) -> None:
    f = fleet(3)
    weights_only = make_version(onnx=None, weights=b"w" * 10)
    with pytest.raises(ServiceError) as err:
        rollout_create(
            actor=None, data={"version": weights_only.pk, "target_group": f.group.pk, "waves": WAVES}
        )
    assert err.value.code == "no_compatible_artifact"


def test_unknown_gate_metric_refused(fleet: Any) -> None:
    f = fleet(3)
    with pytest.raises(ServiceError) as err:
        create(f, gates=[{"metric": "happiness", "max": 1}])
    assert err.value.code == "unknown_metric"
    assert err.value.details["metric"] == "happiness"


def test_overlapping_rollout_refused_naming_the_other(fleet: Any) -> None:
    f = fleet(10)
    first = create(f)
    second_draft = create(f)  # drafts hold no devices
    rollout_start(rollout_id=first.pk, actor=None)
    with pytest.raises(ConflictError) as err:
        create(f, target_device_ids=[str(f.devices[0].pk)], target_group=None)
    assert err.value.code == "overlapping_rollout"
    assert err.value.details["rollout_id"] == first.pk
    with pytest.raises(ConflictError):
        rollout_start(rollout_id=second_draft.pk, actor=None)
    # Another target is fine.
    others = f.add(2, prefix="other", in_group=False)
    create(f, target_group=None, target_device_ids=[str(d.pk) for d in others])


def test_waves_are_deterministic_and_reach_every_device(fleet: Any) -> None:
    f = fleet(20)
    rollout = create(f)
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    expected0 = wave_members(
        rollout_id=rollout.pk, device_ids=[str(d.pk) for d in f.devices], waves=WAVES, wave_index=0
    )
    assert sorted(str(m.device_id) for m in members(rollout)) == sorted(expected0)
    assert len(expected0) == 2
    for m in members(rollout):
        assert m.state == "in_progress"
        assert Device.objects.get(pk=m.device_id).desired_version_id == f.v2.pk
        assert m.deployment is not None and m.deployment.origin_type == "rollout"
        assert m.deployment.origin_id == rollout.pk

    now = t0
    for wave in range(3):
        activate_all_in_progress(rollout)
        if WAVES[wave]["soak_s"]:
            # Before the soak elapsed nothing moves.
            assert rollout_advance(rollout_id=rollout.pk, now=now + timedelta(seconds=30)).action == "waiting"
        now = now + timedelta(seconds=61)
        result = rollout_advance(rollout_id=rollout.pk, now=now)
        assert result.action == ("wave_passed" if wave < 2 else "succeeded"), result
    rollout.refresh_from_db()
    assert rollout.status == "succeeded"
    assert all(Device.objects.get(pk=d.pk).running_version_id == f.v2.pk for d in f.devices)
    assert [m.wave for m in members(rollout)].count(0) == 2
    actions = list(RolloutDecision.objects.filter(rollout=rollout).values_list("action", flat=True))
    assert actions.count("wave_passed") == 2 and actions[-1] == "succeeded"


def test_duplicate_advance_never_skips_or_repeats_a_wave(fleet: Any) -> None:
    f = fleet(20)
    rollout = create(f)
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    activate_all_in_progress(rollout)
    later = t0 + timedelta(seconds=61)
    results = [rollout_advance(rollout_id=rollout.pk, now=later).action for _ in range(3)]
    assert results[0] == "wave_passed"
    assert results[1:] == ["waiting", "waiting"]
    rollout.refresh_from_db()
    assert rollout.current_wave == 1
    assert RolloutDecision.objects.filter(rollout=rollout, action="wave_passed").count() == 1
    assert len(members(rollout)) == 10


@pytest.mark.django_db(transaction=True)
def test_concurrent_advance_moves_one_wave(make_version: Any) -> None:
    from fleet.models import DeviceGroup

    v1, v2 = make_version(), make_version()
    group = DeviceGroup.objects.create(name="edge-c")
    for i in range(20):
        d = Device.objects.create(name=f"c{i}", status="online", running_version=v1, desired_version=v1)
        d.groups.add(group)
    rollout = rollout_create(actor=None, data={"version": v2.pk, "target_group": group.pk, "waves": WAVES})
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    activate_all_in_progress(rollout)
    later = t0 + timedelta(seconds=61)
    barrier = threading.Barrier(4)
    actions: list[str] = []

    def run() -> None:
        from django.db import connection

        try:
            barrier.wait()
            actions.append(rollout_advance(rollout_id=rollout.pk, now=later).action)
        finally:
            connection.close()

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(actions).count("wave_passed") == 1, actions
    rollout.refresh_from_db()
    assert rollout.current_wave == 1
    assert RolloutDecision.objects.filter(rollout=rollout, action="wave_started").count() == 1
    assert RolloutDevice.objects.filter(rollout=rollout).count() == 10


def test_offline_device_counts_as_pending_until_timeout_then_failed(fleet: Any) -> None:
    f = fleet(20)
    rollout = create(
        f, waves=[{"count": 4, "soak_s": 0}, {"percent": 100, "soak_s": 0}], in_progress_timeout_s=300
    )
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    wave = members(rollout)
    for m in wave[:3]:
        report(m.device, "active")
    silent = wave[3]
    Device.objects.filter(pk=silent.device_id).update(status=Device.Status.OFFLINE)
    waiting = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=100))
    assert waiting.action == "waiting"
    assert waiting.stats["in_progress"] == 1 and waiting.stats["failed"] == 0
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=301))
    silent.refresh_from_db()
    assert silent.state == "failed" and silent.error.startswith("timeout")
    # 1 of 4 failed is above the default 10% error threshold: the rollout pauses.
    assert result.action == "paused"
    rollout.refresh_from_db()
    assert rollout.status == "paused"
    decision = RolloutDecision.objects.filter(rollout=rollout, action="paused").get()
    assert decision.metrics["failed"] == 1 and decision.metrics["exposed"] == 4


def test_failed_install_is_retried_with_backoff(fleet: Any) -> None:
    f = fleet(10)
    rollout = create(f, waves=[{"count": 1, "soak_s": 0}], max_retries=1, retry_backoff_s=30)
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    (m,) = members(rollout)
    report(m.device, "failed")
    rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=1))
    m.refresh_from_db()
    assert m.state == "queued" and m.attempts == 1
    assert rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=10)).stats["released"] == 0
    rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=32))
    m.refresh_from_db()
    assert m.state == "in_progress" and m.attempts == 2
    assert Device.objects.get(pk=m.device_id).desired_version_id == f.v2.pk
    report(m.device, "failed")
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=40))
    m.refresh_from_db()
    assert m.state == "failed"
    assert result.action == "paused"


def test_abort_during_downloads(fleet: Any) -> None:
    f = fleet(20)
    rollout = create(f, waves=[{"count": 6, "soak_s": 0}, {"percent": 100, "soak_s": 0}])
    rollout_start(rollout_id=rollout.pk, actor=None)
    wave = members(rollout)
    for m in wave[:2]:
        report(m.device, "active")
    for m in wave[2:]:
        report(m.device, "downloading")
    rollout_abort(rollout_id=rollout.pk, actor=None, reason="wrong build")
    rollout.refresh_from_db()
    assert rollout.status == "aborted"
    for m in wave[:2]:
        device = Device.objects.get(pk=m.device_id)
        assert device.running_version_id == f.v2.pk  # already active: kept
    for m in wave[2:]:
        device = Device.objects.get(pk=m.device_id)
        assert device.desired_version_id == f.v1.pk
        assert device.running_version_id == f.v1.pk
        assert not Deployment.objects.filter(
            device=device, version=f.v2, state__in=["pending", "downloading"]
        ).exists()
        assert Deployment.objects.filter(device=device, version=f.v2, state="superseded").exists()
    assert RolloutDevice.objects.filter(rollout=rollout, state="cancelled").count() == 4


def _latency_gate_setup(f: Any, on_failure: str) -> tuple[Rollout, Any]:
    gates = [{"metric": "latency_p95_ms", "max_increase_pct": 20, "min_samples": 50, "min_devices": 3}]
    rollout = create(f, gates=gates, on_gate_failure=on_failure)
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    activate_all_in_progress(rollout)
    rng = np.random.default_rng(3)
    exposed = {m.device_id for m in members(rollout)}
    for d in f.devices:
        if d.pk in exposed:
            add_metrics(d, f.v2, "latency_ms", rng.normal(15, 1, 100), ts=t0 + timedelta(seconds=5))
        else:
            add_metrics(d, f.v1, "latency_ms", rng.normal(10, 1, 60), ts=t0 + timedelta(seconds=5))
    return rollout, t0


def test_gate_failure_pauses_with_the_numbers(fleet: Any) -> None:
    f = fleet(30)  # the first wave, 10 %, is 3 devices: a gate's minimum
    rollout, t0 = _latency_gate_setup(f, "pause")
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=20))
    assert result.action == "paused"
    decision = RolloutDecision.objects.get(rollout=rollout, action="paused")
    (gate,) = decision.metrics["gates"]
    assert gate["metric"] == "latency_p95_ms" and gate["outcome"] == "failed"
    assert gate["value"] > 1.2 * gate["baseline_value"]
    assert gate["devices"] == 3 and gate["samples"] == 300
    assert gate["baseline_devices"] == 27 and gate["baseline_samples"] == 27 * 60
    assert "latency_p95_ms" in decision.reason and "median of 3 devices" in decision.reason
    # Devices stay where they are when pausing.
    assert Device.objects.filter(running_version=f.v2).count() == 3
    # Resuming restarts the soak window, so old slow samples no longer count.
    rollout_resume(rollout_id=rollout.pk, actor=None)
    rollout.refresh_from_db()
    assert rollout.status == "running"


def test_gate_failure_rolls_back_when_configured(fleet: Any) -> None:
    f = fleet(30)
    rollout, t0 = _latency_gate_setup(f, "rollback")
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=20))
    assert result.action == "rolled_back"
    rollout.refresh_from_db()
    assert rollout.status == "rolled_back"
    decision = RolloutDecision.objects.get(rollout=rollout, action="rolled_back")
    assert decision.metrics["rolled_back_devices"] == 3
    assert decision.metrics["gates"][0]["outcome"] == "failed"
    # Going forward was never a rollback; going back is, so the agents accept the older version.
    assert not Deployment.objects.filter(version=f.v2, rollback=True).exists()
    for m in members(rollout):
        device = Device.objects.get(pk=m.device_id)
        assert device.desired_version_id == f.v1.pk
        assert Deployment.objects.filter(
            device=device, version=f.v1, state="pending", origin_type="rollout", rollback=True
        ).exists()
        report(device, "active")  # the agent installs the previous version again
        assert Device.objects.get(pk=m.device_id).running_version_id == f.v1.pk
    assert all(m.ever_active for m in members(rollout))


def test_gates_wait_for_samples_then_pass(fleet: Any) -> None:
    f = fleet(30)
    gates = [{"metric": "accuracy", "min": 0.8, "min_samples": 50}]
    rollout = create(f, gates=gates)
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    activate_all_in_progress(rollout)
    assert (
        rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=61)).action == "waiting_for_samples"
    )
    # 90 samples in all, but no device has 50 of its own yet.
    for m in members(rollout):
        add_metrics(m.device, f.v2, "correct", [1.0] * 30, ts=t0 + timedelta(seconds=62))
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=63))
    assert result.action == "waiting_for_samples"
    assert "0 of 3 devices with 50+ samples; 3 more with fewer samples" in result.stats["gates"][0]["reason"]
    for m in members(rollout):
        add_metrics(m.device, f.v2, "correct", [1.0] * 30, ts=t0 + timedelta(seconds=64))
    assert rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=65)).action == "wave_passed"
    assert RolloutDecision.objects.filter(rollout=rollout, action="waiting_for_samples").count() == 1


def test_mae_gate_stops_a_regression_rollout(fleet: Any) -> None:
    f = fleet(30, regression=True)
    gates = [{"metric": "mae", "max_increase_pct": 10, "abs_tolerance": 0.01, "min_samples": 50}]
    rollout = create(f, gates=gates, on_gate_failure="rollback")
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    activate_all_in_progress(rollout)
    rng = np.random.default_rng(5)
    exposed = {m.device_id for m in members(rollout)}
    for d in f.devices:
        if d.pk in exposed:
            add_metrics(d, f.v2, "abs_error", np.abs(rng.normal(0.6, 0.05, 60)), ts=t0 + timedelta(seconds=5))
        else:
            add_metrics(d, f.v1, "abs_error", np.abs(rng.normal(0.4, 0.05, 60)), ts=t0 + timedelta(seconds=5))
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=20))
    assert result.action == "rolled_back"
    decision = RolloutDecision.objects.get(rollout=rollout, action="rolled_back")
    (gate,) = decision.metrics["gates"]
    assert gate["metric"] == "mae" and gate["outcome"] == "failed"
    assert gate["value"] == pytest.approx(0.6, abs=0.03) and gate["baseline_value"] == pytest.approx(
        0.4, abs=0.03
    )
    assert gate["samples"] == 180 and gate["baseline_samples"] == 27 * 60
    assert "mae" in decision.reason
    for m in members(rollout):
        assert Device.objects.get(pk=m.device_id).desired_version_id == f.v1.pk


def test_mae_gate_passes_within_its_tolerance(fleet: Any) -> None:
    f = fleet(30, regression=True)
    gates = [{"metric": "mae", "max_increase_pct": 10, "abs_tolerance": 0.05, "min_samples": 50}]
    rollout = create(f, gates=gates)
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    activate_all_in_progress(rollout)
    exposed = {m.device_id for m in members(rollout)}
    for d in f.devices:
        version, value = (f.v2, 0.43) if d.pk in exposed else (f.v1, 0.40)
        add_metrics(d, version, "abs_error", [value] * 60, ts=t0 + timedelta(seconds=5))
    # +7.5 %, and 0.03 is within the tolerance anyway.
    assert rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=61)).action == "wave_passed"


@pytest.mark.parametrize(
    ("regression", "metric", "fits"),
    [
        (True, "accuracy", ["latency_p95_ms", "error_rate", "mae"]),
        (False, "mae", ["latency_p95_ms", "error_rate", "accuracy"]),
    ],
)
def test_gate_of_the_other_task_is_refused(
    fleet: Any, regression: bool, metric: str, fits: list[str]
) -> None:
    f = fleet(3, regression=regression)
    task = "regression" if regression else "classification"
    with pytest.raises(ServiceError) as err:
        create(f, gates=[{"metric": "latency_p95_ms", "max": 50}, {"metric": metric, "min": 0.5}])
    assert err.value.code == "gate_not_for_task"
    assert err.value.details == {"task": task, "metrics": [metric], "fits": fits}
    assert task in err.value.message and "error_rate" in err.value.message
    assert not Rollout.objects.exists()


def test_late_joiners_slot_in_at_the_next_advance(fleet: Any) -> None:
    f = fleet(20)
    rollout = create(f, waves=[{"percent": 50, "soak_s": 60}, {"percent": 100, "soak_s": 0}])
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    initial = {str(m.device_id) for m in members(rollout)}
    assert len(initial) == 10
    late = f.add(10)
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=1))
    all_ids = [str(d.pk) for d in f.devices]
    # The wave now covers 50% of 30 devices in the same hash order: whoever ranks in the
    # first 15 joins (late joiners included); nobody already exposed leaves.
    expected = set(wave_members(rollout_id=rollout.pk, device_ids=all_ids, waves=rollout.waves, wave_index=0))
    now_in = {str(m.device_id) for m in members(rollout)}
    assert now_in == initial | expected
    assert now_in & {str(d.pk) for d in late} == expected & {str(d.pk) for d in late}
    assert result.stats["late_joiners"] == len(now_in) - 10
    # New members are told at once (no download limit set).
    assert all(m.state == "in_progress" for m in members(rollout))


def test_download_concurrency_limit(fleet: Any) -> None:
    f = fleet(10)
    rollout = create(f, waves=[{"count": 5, "soak_s": 0}], max_concurrent_downloads=2)
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    assert len(members(rollout, "in_progress")) == 2 and len(members(rollout, "queued")) == 3
    activate_all_in_progress(rollout)
    rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=1))
    assert len(members(rollout, "succeeded")) == 2 and len(members(rollout, "in_progress")) == 2
    queued_devices = [m.device_id for m in members(rollout, "queued")]
    assert Device.objects.get(pk=queued_devices[0]).desired_version_id == f.v1.pk  # not told yet


def test_closed_maintenance_window_holds_devices(fleet: Any) -> None:
    from fleet.models import UpdatePolicy

    f = fleet(6)
    now = timezone.now()
    # A one-hour window twelve hours away: closed now, whatever the day.
    start = (now + timedelta(hours=12)).strftime("%H:%M")
    end = (now + timedelta(hours=13)).strftime("%H:%M")
    policy = UpdatePolicy.objects.create(
        name="nights", maintenance_windows=[{"days": [], "start": start, "end": end}]
    )
    f.group.policy = policy
    f.group.save()
    rollout = create(f, waves=[{"percent": 100, "soak_s": 0}])
    rollout_start(rollout_id=rollout.pk, actor=None, now=now)
    assert len(members(rollout, "queued")) == 6
    rollout_advance(rollout_id=rollout.pk, now=now + timedelta(hours=12, minutes=5))
    assert len(members(rollout, "in_progress")) == 6


def test_abort_on_a_device_that_ran_nothing_clears_its_desired_version(fleet: Any) -> None:
    f = fleet(0)
    fresh = Device.objects.create(name="fresh", status="online")
    fresh.groups.add(f.group)
    rollout = create(f, waves=[{"percent": 100, "soak_s": 0}])
    rollout_start(rollout_id=rollout.pk, actor=None)
    report(fresh, "downloading")
    rollout_abort(rollout_id=rollout.pk, actor=None)
    fresh.refresh_from_db()
    assert fresh.desired_version_id is None and fresh.running_version_id is None
    assert Deployment.objects.get(device=fresh).state == "superseded"
