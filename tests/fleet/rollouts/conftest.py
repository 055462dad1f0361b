"""Fixtures for rollout, experiment and webhook tests: a fleet on a known version."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _fleet_urls(settings: Any) -> None:
    settings.ROOT_URLCONF = "tests.fleet.rollouts.urls"


@dataclass
class Fleet:
    group: Any
    devices: list[Any]
    v1: Any
    v2: Any

    def add(self, n: int, *, prefix: str = "late", in_group: bool = True) -> list[Any]:
        from fleet.models import Device

        added = []
        for i in range(n):
            device = Device.objects.create(
                name=f"{prefix}-{i}",
                status=Device.Status.ONLINE,
                running_version=self.v1,
                desired_version=self.v1,
            )
            if in_group:
                device.groups.add(self.group)
            added.append(device)
        self.devices.extend(added)
        return added


@pytest.fixture
def fleet(db: Any, make_version: Any, make_regression_version: Any) -> Any:
    """Returns make(n): n online devices in group "edge", all running v1; v2 is new.

    The versions are of the classification family ``digits``, or with ``regression=True``
    of the regression family of ``tests.bundles``.
    """
    from fleet.models import DeviceGroup

    def make(n: int = 20, *, regression: bool = False) -> Fleet:
        versions = make_regression_version if regression else make_version
        v1, v2 = versions(), versions()
        group = DeviceGroup.objects.create(name="edge")
        f = Fleet(group=group, devices=[], v1=v1, v2=v2)
        f.add(n, prefix="board")
        return f

    return make


def report(device: Any, state: str) -> None:
    """What the agent reports for its open deployment (through the real service)."""
    from fleet.models import Deployment, Device
    from fleet.services.deployments import OPEN_STATES, deployment_record_status

    device = Device.objects.get(pk=device.pk)
    deployment = Deployment.objects.filter(device=device, state__in=OPEN_STATES).order_by("-id").first()
    assert deployment is not None, f"{device.name} has no open deployment"
    deployment_record_status(device=device, deployment_id=deployment.pk, state=state)


def add_metrics(device: Any, version: Any, name: str, values: Any, *, ts: datetime) -> None:
    from fleet.models import MetricSample

    MetricSample.objects.bulk_create(
        [
            MetricSample(
                device=device, version=version, name=name, value=float(v), ts=ts + timedelta(milliseconds=i)
            )
            for i, v in enumerate(values)
        ]
    )


def wait_past(ts: datetime, samples: int) -> None:
    """Wait until the last of ``samples`` samples that ``add_metrics`` put after ``ts`` lies in
    the past, for readers (the shadow's report) that count samples up to the present."""
    import time

    from django.utils import timezone

    while timezone.now() <= ts + timedelta(milliseconds=samples):
        time.sleep(0.005)
