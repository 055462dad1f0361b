"""List pages read a fixed number of rows per query: their query count does not grow with the fleet."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from tests.frontend.conftest import Fleet, make_devices

pytestmark = pytest.mark.django_db


def queries_for(client: Any, url: str) -> int:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url)
    assert response.status_code == 200
    return len(ctx.captured_queries)


@pytest.mark.parametrize(
    "url_name",
    ["frontend:overview", "frontend:devices", "frontend:rollouts", "frontend:jobs", "frontend:models"],
)
def test_query_count_is_the_same_for_10_and_100_devices(
    page_client: Any, fleet: Fleet, url_name: str
) -> None:
    from fleet.models import Deployment

    client = page_client("viewer")
    url = reverse(url_name)
    seed_drift(make_devices(count=4, group=fleet.group, version=fleet.version, prefix="small"), fleet.version)
    assert queries_for(client, url) > 0  # warm caches (content types, sessions)
    small = queries_for(client, url)
    grown = make_devices(count=90, group=fleet.group, version=fleet.candidate, prefix="large")
    Deployment.objects.bulk_create(
        [Deployment(device=d, version=fleet.candidate, state="failed", error="x") for d in grown]
    )
    seed_drift(grown, fleet.candidate)
    assert queries_for(client, url) == small


def seed_drift(devices: list[Any], version: Any) -> None:
    """A drift report and personal/global accuracies for every device, some in alert."""
    from django.utils import timezone

    from fleet.models import DriftReport, MetricSample
    from fleet.services.drift import device_drift_latest

    now = timezone.now()
    DriftReport.objects.bulk_create(
        [DriftReport(device=d, window_end=now, alert=i % 2 == 0, score=0.5) for i, d in enumerate(devices)]
    )
    for i, d in enumerate(devices):  # what ingest keeps on the device row
        device_drift_latest(device_id=d.pk, alert=i % 2 == 0, window_end=now)
    MetricSample.objects.bulk_create(
        [
            MetricSample(device=d, version=version, name=name, value=value, ts=now)
            for d in devices
            for name, value in (("global_accuracy", 0.8), ("personal_accuracy", 0.9))
        ]
    )


def test_device_list_filters_keep_the_query_count(page_client: Any, fleet: Fleet) -> None:
    client = page_client("viewer")
    url = reverse("frontend:devices") + f"?status=online&tag=camera&group={fleet.group.pk}"
    make_devices(count=10, group=fleet.group, version=fleet.version, prefix="small")
    queries_for(client, url)
    small = queries_for(client, url)
    make_devices(count=100, group=fleet.group, version=fleet.version, prefix="large")
    assert queries_for(client, url) == small


def test_device_list_paginates_and_filters(page_client: Any, fleet: Fleet) -> None:
    client = page_client("viewer")
    make_devices(count=120, group=None, version=None, prefix="extra")
    response = client.get(reverse("frontend:devices"))
    page = response.context["page_obj"]
    assert page.paginator.count == 126 and len(page.object_list) == 50
    response = client.get(reverse("frontend:devices") + "?status=online&search=extra&page=2")
    page = response.context["page_obj"]
    assert page.number == 2 and page.paginator.count == 60
    assert all(d.status == "online" and d.name.startswith("extra") for d in page.object_list)
    response = client.get(reverse("frontend:devices") + f"?group={fleet.group.pk}")
    assert response.context["page_obj"].paginator.count == 6
