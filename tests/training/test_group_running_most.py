"""Where a flagged version lives: the group with the most devices running it, members by
static membership or by tag, which is where a drift-started job's result is shipped when
no group has the version as its release."""

from __future__ import annotations

from typing import Any

import pytest

from tests.training.federated.conftest import make_fleet

pytestmark = pytest.mark.django_db


def test_static_and_tag_selected_members_count_and_decommissioned_ones_do_not() -> None:
    from fleet.models import Device, DeviceGroup
    from training.services.jobs import group_running_most

    fleet = make_fleet(n_devices=3)
    fleet.group.static_devices.clear()
    Device.objects.filter(pk__in=[d.pk for d in fleet.devices]).update(
        tags=["north"], running_version=fleet.version
    )
    static = DeviceGroup.objects.create(name="static")
    tagged = DeviceGroup.objects.create(name="tagged", tag_selector=["north"])
    static.static_devices.add(fleet.devices[0], fleet.devices[1])
    assert group_running_most(fleet.version) == (tagged, 3)
    Device.objects.filter(pk=fleet.devices[2].pk).update(status=Device.Status.DECOMMISSIONED)
    group, running = group_running_most(fleet.version)
    assert running == 2 and group in (static, tagged)


def test_no_group_runs_the_version(db: Any) -> None:
    from training.services.jobs import group_running_most

    fleet = make_fleet(n_devices=2)
    assert group_running_most(fleet.version) == (None, 0)
