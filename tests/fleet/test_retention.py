"""Metric rollups (computed in SQL, per device) and pruning of the growing tables."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleet.models import (
    DeploymentEvent,
    Device,
    DriftReport,
    MetricBatch,
    MetricRollup,
    MetricSample,
    Rollout,
    WebhookDelivery,
    WebhookEndpoint,
)
from fleet.services.retention import metrics_rollup, prune

pytestmark = pytest.mark.django_db

T0 = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)


def _samples(device: Device, name: str, values: list[float], *, at: datetime, version: Any = None) -> None:
    MetricSample.objects.bulk_create(
        [
            MetricSample(device=device, version=version, name=name, value=v, ts=at + timedelta(minutes=i))
            for i, v in enumerate(values)
        ]
    )


def _rollup(period: str, device: Device, name: str, bucket: datetime, version_key: int = 0) -> MetricRollup:
    return MetricRollup.objects.get(
        period=period, device=device, name=name, bucket=bucket, version_key=version_key
    )


def test_hours_and_days_hold_each_devices_count_and_moments(make_version: Any) -> None:
    version = make_version()
    a, b = Device.objects.create(name="a"), Device.objects.create(name="b")
    _samples(a, "latency_ms", [10.0, 20.0, 30.0], at=T0)
    _samples(a, "latency_ms", [40.0], at=T0 + timedelta(hours=1))
    _samples(b, "latency_ms", [5.0, 7.0], at=T0, version=version)

    done = metrics_rollup()
    assert done["samples"] == 6 and done["hours"] == 2 and done["days"] == 1

    hour = _rollup("hour", a, "latency_ms", T0)
    assert (hour.count, hour.total, hour.total_sq, hour.low, hour.high) == (3, 60.0, 1400.0, 10.0, 30.0)
    assert hour.mean == 20.0
    # Each device keeps its own row: decisions count devices.
    other = _rollup("hour", b, "latency_ms", T0, version_key=version.pk)
    assert (other.count, other.total) == (2, 12.0)
    day = _rollup("day", a, "latency_ms", T0.replace(hour=0))
    assert (day.count, day.total, day.low, day.high) == (4, 100.0, 10.0, 40.0)
    assert math.isclose(day.total_sq, 100 + 400 + 900 + 1600)

    # Nothing new: nothing changes.
    rows = list(MetricRollup.objects.order_by("pk").values())
    assert metrics_rollup()["samples"] == 0
    assert list(MetricRollup.objects.order_by("pk").values()) == rows


def test_a_late_sample_updates_the_old_hour_it_was_measured_in() -> None:
    device = Device.objects.create(name="late")
    _samples(device, "correct", [1.0, 1.0], at=T0)
    metrics_rollup()
    # An offline board's outbox arrives two days late, measured in the same hour.
    later = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)
    _samples(device, "correct", [0.0], at=T0 + timedelta(minutes=30))
    _samples(device, "correct", [1.0], at=later)
    assert metrics_rollup()["hours"] == 2
    assert _rollup("hour", device, "correct", T0).count == 3
    assert _rollup("day", device, "correct", T0.replace(hour=0)).total == 2.0
    assert _rollup("hour", device, "correct", later).count == 1


def test_prune_keeps_what_decisions_and_history_still_need(settings: Any) -> None:
    settings.METRICS_RAW_DAYS = 14
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    device = Device.objects.create(name="old")
    old, recent = now - timedelta(days=20), now - timedelta(days=2)
    _samples(device, "cpu_percent", [1.0, 2.0], at=old)
    _samples(device, "cpu_percent", [3.0], at=recent)
    metrics_rollup()
    # Inserted after the rollup ran: old, but not summed yet, so it must stay.
    _samples(device, "cpu_percent", [4.0], at=old)

    deleted = prune(now=now)
    assert deleted["metric_samples"] == 2
    assert sorted(MetricSample.objects.values_list("value", flat=True)) == [3.0, 4.0]
    # The history is still there, in the rollups.
    assert _rollup("hour", device, "cpu_percent", old.replace(minute=0)).count == 2

    metrics_rollup()
    assert prune(now=now)["metric_samples"] == 1
    assert _rollup("hour", device, "cpu_percent", old.replace(minute=0)).count == 3


def test_a_running_rollout_keeps_the_raw_samples_it_may_read(make_version: Any) -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    device = Device.objects.create(name="gated")
    # Past the raw age, but measured after the day before the rollout started.
    _samples(device, "error", [0.0], at=now - timedelta(days=20))
    metrics_rollup()
    Rollout.objects.create(
        name="long",
        version=make_version(),
        status=Rollout.Status.RUNNING,
        started_at=now - timedelta(days=25),
    )
    assert prune(now=now)["metric_samples"] == 0
    Rollout.objects.update(status=Rollout.Status.SUCCEEDED)
    assert prune(now=now)["metric_samples"] == 1


def test_prune_other_tables_by_their_ages(settings: Any, make_version: Any) -> None:
    from fleet.models import Deployment

    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    device = Device.objects.create(name="tables")
    deployment = Deployment.objects.create(device=device, version=make_version())
    old_event = DeploymentEvent.objects.create(deployment=deployment, state="downloading")
    DeploymentEvent.objects.filter(pk=old_event.pk).update(created_at=now - timedelta(days=100))
    DeploymentEvent.objects.create(deployment=deployment, state="active")

    endpoint = WebhookEndpoint.objects.create(url="https://hooks.example.com/x", secret="s")
    for status in ("delivered", "failed", "pending"):
        WebhookDelivery.objects.create(
            endpoint=endpoint, event_type="rollout.started", status=status, next_attempt_at=now
        )
    WebhookDelivery.objects.update(created_at=now - timedelta(days=40))

    for days in (200, 150):
        report = DriftReport.objects.create(device=device, window_end=now - timedelta(days=days))
        DriftReport.objects.filter(pk=report.pk).update(created_at=now - timedelta(days=days))
    MetricBatch.objects.create(device=device, batch_id="b1", samples=1)
    MetricBatch.objects.update(received_at=now - timedelta(days=15))

    deleted = prune(now=now)
    assert deleted["deployment_events"] == 1
    assert list(DeploymentEvent.objects.values_list("state", flat=True)) == ["active"]
    # A delivery still being retried is never dropped.
    assert deleted["webhook_deliveries"] == 2
    assert list(WebhookDelivery.objects.values_list("status", flat=True)) == ["pending"]
    # A device's newest drift report stays, however old.
    assert deleted["drift_reports"] == 1
    assert DriftReport.objects.get().window_end == now - timedelta(days=150)
    assert deleted["metric_batches"] == 1
