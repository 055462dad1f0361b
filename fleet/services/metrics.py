"""Metrics batches from devices: validated, stored once per (device, batch_id)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import IntegrityError, transaction

from core.api import ServiceError
from fleet.models import Device, MetricBatch, MetricSample


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
    from models_registry.models import ModelVersion

    version_ids = {s.version_id for s in samples if s.version_id is not None}
    if version_ids:
        known = set(ModelVersion.objects.filter(pk__in=version_ids).values_list("pk", flat=True))
        unknown = sorted(version_ids - known)
        if unknown:
            raise ServiceError(
                f"Unknown model version id {unknown[0]}.",
                code="validation_error",
                details={"version_id": unknown},
            )
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
