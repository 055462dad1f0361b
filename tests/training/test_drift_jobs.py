"""A flag that starts the loop: by the family's policy (off by default), a federated job from
the flagged version on the boards where it drifted, at most one per family per interval."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from tests.training.federated.conftest import Fleet, make_fleet

pytestmark = pytest.mark.django_db


def _drifting(fleet: Fleet, version: Any) -> None:
    """Every device runs ``version``; device 0 has a drift alert and 0.80 accuracy, device 1
    only 0.80 accuracy, device 2 is fine (1.0, no alert): the median, 0.80, flags it."""
    from fleet.models import Device, DriftReport, MetricSample

    version.metrics = {**(version.metrics or {}), "accuracy": 0.95}
    version.save(update_fields=["metrics"])
    Device.objects.filter(pk__in=[d.pk for d in fleet.devices]).update(running_version=version)
    now = timezone.now()
    DriftReport.objects.create(device=fleet.devices[0], version=version, window_end=now, alert=True)
    DriftReport.objects.create(device=fleet.devices[2], version=version, window_end=now, alert=False)
    MetricSample.objects.bulk_create(
        MetricSample(device=device, version=version, name="correct", value=1.0 if i < good else 0.0, ts=now)
        for device, good in zip(fleet.devices, (80, 80, 100), strict=True)
        for i in range(100)
    )


def _policy(fleet: Fleet, **fields: Any) -> None:
    from fleet.models import FamilyPolicy

    FamilyPolicy.objects.update_or_create(family=fleet.family, defaults=fields)


def test_a_flag_starts_a_job_on_the_boards_where_the_version_drifted(
    django_capture_on_commit_callbacks: Any,
) -> None:
    from core.audit.models import AuditEvent
    from core.events import subscribed
    from fleet.models import VersionDecision
    from fleet.services.drift import drift_check
    from training.models import FederatedJob

    fleet = make_fleet(n_devices=3)
    _policy(fleet, drift_job=True, auto_ship=True)
    _drifting(fleet, fleet.version)
    heard: list[Any] = []
    with (
        subscribed(heard.append, names=["federated_job.started_by_drift"]),
        django_capture_on_commit_callbacks(execute=True),
    ):
        assert drift_check() == [fleet.version.pk]
    job = FederatedJob.objects.get()
    assert job.status == "running" and job.base_version == fleet.version
    members = set(job.target_group.static_devices.values_list("pk", flat=True))
    assert members == {fleet.devices[0].pk, fleet.devices[1].pk}
    assert job.target_group.name.startswith(f"drift-{fleet.family.name}-v{fleet.version.number}-")
    assert job.min_clients == job.quorum == 2
    decision = VersionDecision.objects.get()
    assert (decision.action, decision.trigger, decision.job_id) == ("drift_job_started", "flag", job.pk)
    assert decision.metrics["metric"] == "accuracy" and decision.metrics["value"] == 0.8
    assert decision.detail["device_count"] == 2 and decision.detail["auto_ship"] is True
    assert [e.payload["job"] for e in heard] == [job.pk]
    assert heard[0].payload["devices"] == 2
    assert AuditEvent.objects.filter(action="federated_job.started_by_drift").count() == 1


def test_off_by_default(django_capture_on_commit_callbacks: Any) -> None:
    from fleet.models import VersionDecision
    from fleet.services.drift import drift_check
    from training.models import FederatedJob

    fleet = make_fleet(n_devices=3)
    _drifting(fleet, fleet.version)
    with django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == [fleet.version.pk]
    assert not FederatedJob.objects.exists() and not VersionDecision.objects.exists()


def test_at_most_one_job_per_family_per_interval(django_capture_on_commit_callbacks: Any) -> None:
    from fleet.models import VersionDecision
    from fleet.services.drift import drift_check
    from tests.bundles import digits_version
    from training.models import FederatedJob
    from training.services import job_cancel

    fleet = make_fleet(n_devices=3)
    _policy(fleet, drift_job=True, drift_job_interval_s=3600)
    _drifting(fleet, fleet.version)
    with django_capture_on_commit_callbacks(execute=True):
        drift_check()
    first = FederatedJob.objects.get()
    job_cancel(job_id=first.pk, actor=None)  # not active: only the rate limit holds the next one
    second = digits_version(fleet.family)
    _drifting(fleet, second)
    with django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == [second.pk]
    assert FederatedJob.objects.count() == 1
    skipped = VersionDecision.objects.get(version=second)
    assert (skipped.action, skipped.reason) == ("drift_job_skipped", "rate_limited")
    assert skipped.detail["last_job"] == first.pk and skipped.detail["interval_s"] == 3600
    # Once the interval has passed, a flag starts a job again.
    from training.services.drift_jobs import job_start_for_drift

    VersionDecision.objects.filter(job_id=first.pk).update(created_at=timezone.now() - timedelta(hours=2))
    with django_capture_on_commit_callbacks(execute=True):
        decision = job_start_for_drift(version_id=second.pk, flag={"reason": "accuracy_drop"})
    assert decision is not None and decision.action == "drift_job_started"
    assert decision.job_id is not None
    assert FederatedJob.objects.get(pk=decision.job_id).base_version == second


def test_skipped_with_a_reason(django_capture_on_commit_callbacks: Any) -> None:
    from fleet.models import Device
    from tests.training.federated.conftest import make_job
    from training.services.drift_jobs import job_start_for_drift

    fleet = make_fleet(n_devices=3)
    _policy(fleet, drift_job=True)
    nobody = job_start_for_drift(version_id=fleet.version.pk, flag={"reason": "accuracy_drop"})
    assert nobody is not None and (nobody.action, nobody.reason) == (
        "drift_job_skipped",
        "no_drifted_devices",
    )
    _drifting(fleet, fleet.version)
    job = make_job(fleet)
    busy = job_start_for_drift(version_id=fleet.version.pk, flag={"reason": "accuracy_drop"})
    assert busy is not None and (busy.reason, busy.detail["job"]) == ("job_active", job.pk)
    assert job_start_for_drift(version_id=999999, flag={}) is None
    assert Device.objects.count() == 3
