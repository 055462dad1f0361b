"""The loop's automatic steps: inputs that drift on several boards flag the version; with the
family's policy a drift-started job is shipped when it succeeds (in shadow, then waves
against control), or the refusal is recorded; the sweep ships one whose event was lost."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from tests.training.federated.conftest import Fleet, finished_job, make_fleet

pytestmark = pytest.mark.django_db


def _alerts(fleet: Fleet, devices: list[Any], *, effect: float = 1.5) -> None:
    from fleet.models import Device, DriftReport

    Device.objects.filter(pk__in=[d.pk for d in fleet.devices]).update(
        running_version=fleet.version, desired_version=fleet.version
    )
    now = timezone.now()
    for device in devices:
        DriftReport.objects.create(
            device=device, version=fleet.version, window_end=now, alert=True, effect_size=effect
        )


def _policy(fleet: Fleet, **fields: Any) -> None:
    from fleet.models import FamilyPolicy

    FamilyPolicy.objects.update_or_create(family=fleet.family, defaults=fields)


def test_inputs_drifting_on_enough_boards_flag_the_version_and_start_a_job_there(
    django_capture_on_commit_callbacks: Any,
) -> None:
    from core.events import subscribed
    from fleet.services.drift import INPUT_DRIFT_KEY, drift_check
    from training.models import FederatedJob

    fleet = make_fleet(n_devices=9)
    _policy(fleet, drift_job=True)
    _alerts(fleet, fleet.devices[:2])
    assert drift_check() == []  # two boards are not enough (DRIFT_MIN_DEVICES = 3)
    _alerts(fleet, fleet.devices[:3])
    heard: list[Any] = []
    with subscribed(heard.append, names=["model.flagged"]), django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == [fleet.version.pk]
    fleet.version.refresh_from_db()
    flag = fleet.version.metrics[INPUT_DRIFT_KEY]
    assert flag["reason"] == "input_drift" and flag["devices"] == 3 and flag["running"] == 9
    assert flag["effect_size"] == 1.5 and "flagged" not in fleet.version.metrics
    assert heard[0].payload["reason"] == "input_drift"
    job = FederatedJob.objects.get()
    assert set(job.target_group.static_devices.values_list("pk", flat=True)) == {
        d.pk for d in fleet.devices[:3]
    }
    # Flagged once: the next check changes nothing.
    assert drift_check() == []


def test_a_board_whose_latest_report_no_longer_alerts_does_not_count() -> None:
    from fleet.models import DriftReport
    from fleet.services.drift import drift_check

    fleet = make_fleet(n_devices=6)
    _alerts(fleet, fleet.devices[:3])
    # One of the three sent a window after its alert that is back to normal: two in alert.
    DriftReport.objects.create(
        device=fleet.devices[0], version=fleet.version, window_end=timezone.now(), alert=False
    )
    assert drift_check() == []
    _alerts(fleet, fleet.devices[3:4])
    assert drift_check() == [fleet.version.pk]


def test_a_board_no_longer_running_the_version_does_not_count(
    django_capture_on_commit_callbacks: Any,
) -> None:
    from fleet.models import Device
    from fleet.services.drift import drift_check

    fleet = make_fleet(n_devices=4)
    _alerts(fleet, fleet.devices[:3])
    Device.objects.filter(pk=fleet.devices[0].pk).update(running_version=None)
    assert drift_check() == []


def test_input_drift_does_not_revert_a_watched_version(django_capture_on_commit_callbacks: Any) -> None:
    from fleet.models import Rollout, VersionDecision
    from fleet.services.drift import drift_check

    fleet = make_fleet(n_devices=4)
    _policy(fleet, on_failure="revert")
    Rollout.objects.create(
        version=fleet.version,
        target_group=fleet.group,
        status=Rollout.Status.SUCCEEDED,
        finished_at=timezone.now(),
    )
    _alerts(fleet, fleet.devices[:3])
    with django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == [fleet.version.pk]
    assert not VersionDecision.objects.filter(action="reverted").exists()


def _drift_started(fleet: Fleet, **policy: Any) -> Any:
    """A succeeded job, recorded as started by drift on the version the group runs."""
    from fleet.models import DeviceGroup, VersionDecision
    from fleet.services.revert import version_decision_record
    from training.models import FederatedJob

    _policy(fleet, drift_job=True, **policy)
    drifted = DeviceGroup.objects.create(name="drift-digits-v1")
    drifted.static_devices.add(*fleet.devices[:3])
    job = finished_job(fleet)
    FederatedJob.objects.filter(pk=job.pk).update(target_group=drifted)
    version_decision_record(
        version=fleet.version,
        action=VersionDecision.Action.DRIFT_JOB_STARTED,
        trigger=VersionDecision.Trigger.FLAG,
        reason="flagged input_drift",
        job_id=job.pk,
    )
    DeviceGroup.objects.filter(pk=fleet.group.pk).update(canary=True, release_version=fleet.version)
    return job


def test_a_succeeded_drift_job_is_shipped_to_the_release_group_in_shadow(
    django_capture_on_commit_callbacks: Any,
) -> None:
    from core.events import emit, subscribed
    from fleet.models import Rollout, VersionDecision

    fleet = make_fleet(n_devices=30)
    job = _drift_started(fleet, auto_ship=True)
    heard: list[Any] = []
    with (
        subscribed(heard.append, names=["federated_job.shipped"]),
        django_capture_on_commit_callbacks(execute=True),
    ):
        emit("federated_job.status", {"job": job.pk, "status": "succeeded"})
    decision = VersionDecision.objects.get(action="auto_shipped")
    rollout = Rollout.objects.get(pk=decision.detail["rollout"])
    # Shipped to the group the flagged version is released to, not the drift job's own group.
    assert rollout.target_group_id == fleet.group.pk and rollout.status == Rollout.Status.SHADOW
    assert rollout.version_id == job.best_version_id and rollout.control_percent == 20
    assert decision.trigger == "job" and decision.job_id == job.pk
    assert decision.metrics["evaluation"]["value"] == 0.95
    assert [e.payload["rollout_id"] for e in heard] == [rollout.pk]
    # Delivered twice, decided once.
    with django_capture_on_commit_callbacks(execute=True):
        emit("federated_job.status", {"job": job.pk, "status": "succeeded"})
    assert VersionDecision.objects.filter(action__startswith="auto_ship").count() == 1


def test_without_auto_ship_the_job_waits_for_a_click(django_capture_on_commit_callbacks: Any) -> None:
    from core.events import emit
    from fleet.models import Rollout, VersionDecision

    fleet = make_fleet(n_devices=10)
    job = _drift_started(fleet, auto_ship=False)
    with django_capture_on_commit_callbacks(execute=True):
        emit("federated_job.status", {"job": job.pk, "status": "succeeded"})
    assert (
        not Rollout.objects.exists()
        and not VersionDecision.objects.filter(action__startswith="auto").exists()
    )


def test_a_refused_ship_is_recorded_with_its_reason(django_capture_on_commit_callbacks: Any) -> None:
    from core.events import subscribed
    from fleet.models import Rollout, VersionDecision
    from training.models import FederatedJob
    from training.services.shipping import job_auto_ship

    fleet = make_fleet(n_devices=10)
    job = _drift_started(fleet, auto_ship=True)
    # No round beat the base: nothing new to ship.
    FederatedJob.objects.filter(pk=job.pk).update(best_version=fleet.version)
    heard: list[Any] = []
    with (
        subscribed(heard.append, names=["federated_job.auto_ship_skipped"]),
        django_capture_on_commit_callbacks(execute=True),
    ):
        decision = job_auto_ship(job_id=job.pk)
    assert decision.action == VersionDecision.Action.AUTO_SHIP_SKIPPED
    assert decision.detail["code"] == "no_improvement" and "not shipped" in decision.reason
    assert not Rollout.objects.exists()
    assert [e.payload["code"] for e in heard] == ["no_improvement"]


def test_the_sweep_ships_a_job_whose_event_was_lost() -> None:
    from fleet.models import VersionDecision
    from training.services.shipping import auto_ship_redrive

    fleet = make_fleet(n_devices=30)
    job = _drift_started(fleet, auto_ship=True)
    now = timezone.now()
    assert auto_ship_redrive(now=now, grace=timedelta(seconds=60)) == []  # still within its grace
    assert auto_ship_redrive(now=now + timedelta(seconds=120), grace=timedelta(seconds=60)) == [job.pk]
    assert VersionDecision.objects.filter(action="auto_shipped", job_id=job.pk).count() == 1
    assert auto_ship_redrive(now=now + timedelta(seconds=180), grace=timedelta(seconds=60)) == []
