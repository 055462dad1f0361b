"""The overview's counts: read from indexes, decommissioned devices left out of every figure."""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse

from tests.frontend.conftest import Fleet, make_devices
from tests.frontend.test_query_counts import seed_drift

pytestmark = pytest.mark.django_db


def _expected(devices: list[Any]) -> dict[str, int]:
    from frontend.selectors import FAILED_STATES, UPDATING_STATES

    live = [d for d in devices if d.status != "decommissioned"]
    return {
        "total": len(live),
        "online": sum(d.status == "online" for d in devices),
        "offline": sum(d.status == "offline" for d in devices),
        "pending": sum(d.status == "pending" for d in devices),
        "decommissioned": len(devices) - len(live),
        "updating": sum(d.deployment_state in UPDATING_STATES for d in live),
        "failed": sum(d.deployment_state in FAILED_STATES for d in live),
    }


def test_counts_and_versions_leave_decommissioned_devices_out(page_client: Any, fleet: Fleet) -> None:
    from fleet.models import Device

    extra = make_devices(count=6, group=fleet.group, version=fleet.candidate, prefix="extra")
    states = ["failed", "downloading", "rolled_back", "active", "health_check", "failed"]
    for device, state, status in zip(extra, states, ["decommissioned"] * 3 + ["offline"] * 3, strict=True):
        Device.objects.filter(pk=device.pk).update(deployment_state=state, status=status)
    devices = list(Device.objects.all())
    response = page_client("viewer").get(reverse("frontend:overview"))
    assert response.status_code == 200
    assert response.context["counts"] == _expected(devices)
    live = [d for d in devices if d.status != "decommissioned"]
    expected_versions: dict[Any, int] = {}
    for d in live:
        expected_versions[d.running_version_id] = expected_versions.get(d.running_version_id, 0) + 1
    rows = response.context["versions"]
    shown = {(row["version"].pk if row["version"] else None): row["devices"] for row in rows}
    assert shown == expected_versions
    assert [row["devices"] for row in rows] == sorted(shown.values(), reverse=True)


def test_a_version_only_decommissioned_devices_ran_is_not_listed(page_client: Any, fleet: Fleet) -> None:
    from fleet.models import Device

    retired = make_devices(count=2, group=fleet.group, version=fleet.candidate, prefix="retired")
    Device.objects.filter(pk__in=[d.pk for d in retired]).update(status="decommissioned")
    Device.objects.filter(running_version=fleet.candidate).exclude(pk__in=[d.pk for d in retired]).update(
        running_version=fleet.version
    )
    response = page_client("viewer").get(reverse("frontend:overview"))
    assert fleet.candidate.pk not in {
        row["version"].pk for row in response.context["versions"] if row["version"]
    }


def test_panels_leave_decommissioned_devices_out(page_client: Any, fleet: Fleet) -> None:
    from fleet.models import Device

    reporting = make_devices(count=4, group=fleet.group, version=fleet.version, prefix="drifting")
    seed_drift(reporting, fleet.version)
    Device.objects.filter(pk=reporting[0].pk).update(status="decommissioned")
    response = page_client("viewer").get(reverse("frontend:overview"))
    [group] = [g for g in response.context["drift_groups"] if g["group_id"] == fleet.group.pk]
    assert group["reporting"] == 3
    [personal] = [g for g in response.context["personal_groups"] if g["group_id"] == fleet.group.pk]
    assert personal["devices"] == 3
