"""A rollout with a control cohort judged by the real periodic task on a real Celery worker."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from tests.fleet.rollouts.conftest import add_metrics, report
from tests.fleet.rollouts.test_live import _wait

pytestmark = pytest.mark.slow


def test_worker_stops_a_worse_candidate_against_control_in_the_first_wave(
    transactional_db: Any, live_stack: Any, make_version: Any
) -> None:
    from fleet.models import Device, DeviceGroup, Rollout, RolloutDecision, RolloutDevice
    from fleet.services.control import control_ids
    from fleet.services.rollouts import rollout_create, rollout_start
    from fleet.tasks.rollouts import rollouts_advance

    v1, v2 = make_version(), make_version()
    group = DeviceGroup.objects.create(name="live-control")
    devices = []
    for i in range(40):
        device = Device.objects.create(
            name=f"lc-{i}", status="online", running_version=v1, desired_version=v1
        )
        device.groups.add(group)
        devices.append(device)
    rollout = rollout_create(
        actor=None,
        data={
            "version": v2.pk,
            "target_group": group.pk,
            "waves": [{"count": 10, "soak_s": 3600}, {"percent": 100, "soak_s": 0}],
            "control_percent": 25,
            "control_gates": [{"metric": "accuracy", "min_samples": 40}],
            "on_gate_failure": "rollback",
        },
    )
    rollout_start(rollout_id=rollout.pk, actor=None)
    control = set(control_ids(rollout=rollout))
    assert len(control) == 10
    members = list(RolloutDevice.objects.filter(rollout=rollout).select_related("device"))
    assert len(members) == 10 and not {str(m.device_id) for m in members} & control
    for member in members:
        report(member.device, "active")
    rng = np.random.default_rng(9)
    ts = timezone.now() + timedelta(seconds=1)
    for member in members:
        add_metrics(member.device, v2, "correct", (rng.random(150) < 0.7).astype(float), ts=ts)
    for device in devices:
        if str(device.pk) in control:
            add_metrics(device, v1, "correct", (rng.random(150) < 0.93).astype(float), ts=ts)
    # The samples must fall inside the window the worker judges (it reads up to now + 1 s).
    _wait(lambda: timezone.now() > ts + timedelta(seconds=1), timeout=10, what="the clock", stack=live_stack)
    rollouts_advance.delay()
    _wait(
        lambda: Rollout.objects.get(pk=rollout.pk).status == "rolled_back",
        timeout=60,
        what="the rollback",
        stack=live_stack,
    )
    decision = RolloutDecision.objects.get(rollout=rollout, action="rolled_back")
    (gate,) = decision.metrics["control"]["gates"]
    assert gate["outcome"] == "failed" and decision.wave == 0
    assert gate["candidate"]["devices"] == 10 and gate["control"]["devices"] == 10
    # The control cohort never left the incumbent.
    assert all(Device.objects.get(pk=d).desired_version_id == v1.pk for d in control)
