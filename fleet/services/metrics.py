"""Metrics batches from devices: validated, stored once per (device, batch_id).

A device speaks only for itself: each sample's value is within its metric's range (the
device API checks ``wire.METRIC_RANGES``), its ``version_id`` is a version the device
runs, was given, ran before, or was deployed or given to run in shadow in the last
``METRICS_VERSION_WINDOW_DAYS`` (what an offline board may still hold in its outbox),
and a device stores at most ``METRICS_MAX_SAMPLES_PER_HOUR`` samples an hour (429 with
``Retry-After`` beyond, which the agent answers by keeping the batch for later).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.utils import timezone

from core.api import ServiceError
from fleet.models import Deployment, Device, MetricBatch, MetricSample, ShadowMember


@dataclass(frozen=True)
class Sample:
    """One validated measurement."""

    name: str
    value: float
    ts: datetime
    version_id: int | None


def metrics_ingest(*, device: Device, batch_id: str, samples: list[Sample]) -> tuple[int, bool]:
    """Store a batch; returns (samples accepted, whether it was a duplicate).

    The MetricBatch row is the idempotency record: its unique (device, batch_id) makes a
    resent batch fail to insert, and the samples are written in the same transaction, so
    a batch is stored entirely or not at all, and once.
    """
    version_ids = {s.version_id for s in samples if s.version_id is not None}
    if version_ids:
        foreign = sorted(version_ids - device_reporting_versions(device=device, among=version_ids))
        if foreign:
            raise ServiceError(
                f"Model version {foreign[0]} is not one this device runs, was given or ran before.",
                code="version_not_yours",
                details={"version_id": foreign},
            )
    if MetricBatch.objects.filter(device=device, batch_id=batch_id).exists():
        return 0, True  # a resent batch costs nothing against the cap
    _charge(device=device, samples=len(samples))
    with transaction.atomic():
        try:
            with transaction.atomic():
                MetricBatch.objects.create(device=device, batch_id=batch_id, samples=len(samples))
        except IntegrityError:
            return 0, True
        MetricSample.objects.bulk_create(
            [
                MetricSample(device=device, version_id=s.version_id, name=s.name, value=s.value, ts=s.ts)
                for s in samples
            ],
            batch_size=500,
        )
    return len(samples), False


def device_reporting_versions(*, device: Device, among: set[int]) -> set[int]:
    """Which of ``among`` the device may report metrics for (see the module docstring)."""
    own = {device.running_version_id, device.desired_version_id, device.previous_version_id}
    allowed = {v for v in among if v in own}
    rest = among - allowed
    if rest:
        since = timezone.now() - timedelta(days=float(settings.METRICS_VERSION_WINDOW_DAYS))
        allowed |= set(
            Deployment.objects.filter(device=device, version_id__in=rest, created_at__gte=since).values_list(
                "version_id", flat=True
            )
        )
    rest -= allowed
    if rest:
        # A candidate the device runs (or ran) in shadow beside its active model.
        allowed |= set(
            ShadowMember.objects.filter(
                device=device, shadow__version_id__in=rest, created_at__gte=since
            ).values_list("shadow__version_id", flat=True)
        )
    return allowed


def _charge(*, device: Device, samples: int) -> None:
    """Count ``samples`` against the device's hourly cap, or refuse the batch (429)."""
    cap = int(settings.METRICS_MAX_SAMPLES_PER_HOUR)
    if cap <= 0:
        return
    hour = int(time.time() // 3600)
    key = f"metrics-cap:{device.pk}:{hour}"
    cache.add(key, 0, timeout=3700)
    try:
        used = int(cache.incr(key, samples))
    except ValueError:  # the key expired between add and incr
        cache.set(key, samples, timeout=3700)
        used = samples
    if used > cap:
        cache.decr(key, samples)
        retry = int(3600 - time.time() % 3600) + 1
        raise ServiceError(
            f"This device sent more than {cap} metric samples this hour; try again later.",
            code="rate_limited",
            status_code=429,
            details={"retry_after_s": retry},
            retry_after_s=retry,
        )
