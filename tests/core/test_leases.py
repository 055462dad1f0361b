"""core.leases on a real table: one holder at a time, taken over only once expired."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db.models import Q
from django.utils import timezone

from core.leases import Lease, LeaseLost

pytestmark = pytest.mark.django_db


@pytest.fixture
def row() -> Any:
    from models_registry.models import ModelFamily, ModelJob, ModelVersion

    family = ModelFamily.objects.create(name="lease-test", arch="mlp", input_shape=[4], num_classes=2)
    version = ModelVersion.objects.create(family=family, number=1)
    return ModelJob.objects.create(kind="evaluate", version=version)


def lease() -> Lease:
    from models_registry.models import ModelJob

    return Lease(ModelJob, "lease_expires_at", lambda: 60.0)


def test_one_claim_wins_and_the_holder_renews(row: Any) -> None:
    first = lease().claim(row.pk, where=Q(status="queued"), status="running")
    assert first is not None
    assert lease().claim(row.pk) is None  # held
    renewed = lease().renew(row.pk, first, progress=0.5)
    row.refresh_from_db()
    assert row.lease_expires_at == renewed and row.progress == 0.5 and row.status == "running"


def test_an_expired_lease_is_taken_over_and_the_old_holder_learns_it(row: Any) -> None:
    old = lease().claim(row.pk)
    past = timezone.now() - timedelta(seconds=1)
    type(row).objects.filter(pk=row.pk).update(lease_expires_at=past)
    new = lease().claim(row.pk)
    assert new is not None
    with pytest.raises(LeaseLost):
        lease().renew(row.pk, past if old is None else old)
    assert not lease().release(row.pk, old)
    assert lease().release(row.pk, new, status="succeeded")
    row.refresh_from_db()
    assert row.lease_expires_at is None and row.status == "succeeded"


def test_where_limits_the_claim_to_rows_that_want_work(row: Any) -> None:
    assert lease().claim(row.pk, where=Q(status="succeeded")) is None
