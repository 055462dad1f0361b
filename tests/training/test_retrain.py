"""Retraining a flagged model: training hears ``model.flagged`` and starts one short job
from the version, on the group running it most, after the flag committed."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone

from tests.training.federated.conftest import Fleet, make_fleet

pytestmark = pytest.mark.django_db


def _feedback(fleet: Fleet, *, n: int = 100, correct: int = 80) -> None:
    """Labelled feedback for the fleet's version from each of its devices (flags count
    devices): 0.80 accuracy against 0.95 evaluated."""
    from fleet.models import MetricSample

    fleet.version.metrics = {"accuracy": 0.95}
    fleet.version.save(update_fields=["metrics"])
    now = timezone.now()
    MetricSample.objects.bulk_create(
        MetricSample(
            device=device,
            version=fleet.version,
            name="correct",
            value=1.0 if i < correct else 0.0,
            ts=now,
        )
        for device in fleet.devices
        for i in range(n)
    )


def _running(fleet: Fleet, devices: list[Any]) -> None:
    from fleet.models import Device

    Device.objects.filter(pk__in=[d.pk for d in devices]).update(running_version=fleet.version)


def _groups(fleet: Fleet) -> tuple[Any, Any]:
    """Two groups running the version: ``busy`` with two devices, ``quiet`` with one."""
    from fleet.models import DeviceGroup

    fleet.group.static_devices.clear()
    busy, quiet = DeviceGroup.objects.create(name="busy"), DeviceGroup.objects.create(name="quiet")
    busy.static_devices.add(fleet.devices[0], fleet.devices[1])
    quiet.static_devices.add(fleet.devices[2])
    _running(fleet, fleet.devices)
    return busy, quiet


@pytest.mark.parametrize("enabled", [True, False])
def test_a_flag_starts_one_job_on_the_group_running_the_version_most(
    settings: Any, django_capture_on_commit_callbacks: Any, enabled: bool
) -> None:
    from fleet.services.drift import drift_check
    from training.models import FederatedJob
    from training.services import RETRAIN_ROUNDS, job_retrain_for_flag

    settings.DRIFT_AUTO_RETRAIN = enabled
    fleet = make_fleet(n_devices=3)
    busy, _ = _groups(fleet)
    _feedback(fleet)
    with django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == [fleet.version.pk]
    fleet.version.refresh_from_db()
    jobs = list(FederatedJob.objects.all())
    if not enabled:
        assert jobs == [] and "retrain_job" not in fleet.version.metrics["flagged"]
        return
    [job] = jobs
    assert job.status == "running" and job.target_group == busy and job.base_version == fleet.version
    assert job.rounds == RETRAIN_ROUNDS and job.min_clients == job.quorum == 2
    assert fleet.version.metrics["flagged"]["retrain_job"] == job.pk
    assert fleet.version.metrics["flagged"]["reason"] == "accuracy_drop"  # the flag itself is kept
    # One job per flag: drift_check flags nothing new, and hearing the flag again starts nothing.
    with django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == []
    assert job_retrain_for_flag(version_id=fleet.version.pk) == job.pk
    assert FederatedJob.objects.count() == 1


def test_the_flag_commits_before_training_reacts(
    settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from fleet.services.drift import drift_check
    from training.models import FederatedJob

    settings.DRIFT_AUTO_RETRAIN = True
    fleet = make_fleet(n_devices=3)
    _groups(fleet)
    _feedback(fleet)
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert drift_check() == [fleet.version.pk]
    fleet.version.refresh_from_db()
    assert "retrain_job" not in fleet.version.metrics["flagged"] and not FederatedJob.objects.exists()
    for callback in callbacks:
        callback()
    fleet.version.refresh_from_db()
    assert fleet.version.metrics["flagged"]["retrain_job"] == FederatedJob.objects.get().pk


def test_no_job_while_one_of_the_family_is_under_way(
    settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from fleet.services.drift import drift_check
    from training.models import FederatedJob

    settings.DRIFT_AUTO_RETRAIN = True
    fleet = make_fleet(n_devices=3)
    _groups(fleet)
    FederatedJob.objects.create(
        name="already",
        family=fleet.family,
        base_version=fleet.version,
        target_group=fleet.group,
        status="paused",
    )
    _feedback(fleet)
    with django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == [fleet.version.pk]
    fleet.version.refresh_from_db()
    assert fleet.version.metrics["flagged"]["retrain_job"] is None
    assert FederatedJob.objects.count() == 1


def test_tag_selected_members_count(settings: Any, django_capture_on_commit_callbacks: Any) -> None:
    from fleet.models import Device, DeviceGroup
    from fleet.services.drift import drift_check
    from training.models import FederatedJob

    settings.DRIFT_AUTO_RETRAIN = True
    fleet = make_fleet(n_devices=3)
    fleet.group.static_devices.clear()
    Device.objects.filter(pk__in=[d.pk for d in fleet.devices]).update(tags=["north"])
    _running(fleet, fleet.devices)
    static = DeviceGroup.objects.create(name="static")
    tagged = DeviceGroup.objects.create(name="tagged", tag_selector=["north"])
    static.static_devices.add(fleet.devices[0], fleet.devices[1])
    _feedback(fleet)
    with django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == [fleet.version.pk]
    [job] = FederatedJob.objects.all()
    assert job.target_group == tagged and job.min_clients == 2


def test_no_group_runs_the_version_no_job() -> None:
    from training.models import FederatedJob
    from training.services import job_retrain_for_flag

    fleet = make_fleet(n_devices=2)
    fleet.version.metrics = {"accuracy": 0.95, "flagged": {"reason": "accuracy_drop"}}
    fleet.version.save(update_fields=["metrics"])
    assert job_retrain_for_flag(version_id=fleet.version.pk) is None
    fleet.version.refresh_from_db()
    assert fleet.version.metrics["flagged"]["retrain_job"] is None and not FederatedJob.objects.exists()
    # A version that is not flagged is left alone.
    other = make_fleet(n_devices=1, name="other")
    assert job_retrain_for_flag(version_id=other.version.pk) is None
    other.version.refresh_from_db()
    assert "flagged" not in other.version.metrics
