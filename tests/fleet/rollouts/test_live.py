"""A rollout driven by the real periodic task on a real Celery worker, with a signed webhook."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.fleet.rollouts.conftest import report
from tests.fleet.rollouts.test_webhooks import SECRET, Receiver

pytestmark = pytest.mark.slow


def _wait(predicate: Callable[[], bool], *, timeout: float, what: str, stack: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}\n{stack.log('worker')[-3000:]}")


def test_worker_advances_rollout_and_delivers_webhook(
    transactional_db: Any, live_stack: Any, make_version: Any
) -> None:
    from fleet.models import Device, DeviceGroup, Rollout, RolloutDevice, WebhookDelivery, WebhookEndpoint
    from fleet.services.rollouts import rollout_create, rollout_start
    from fleet.services.webhooks import webhook_verify
    from fleet.tasks.rollouts import rollouts_advance

    receiver = Receiver()
    try:
        WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET, event_types=["rollout.succeeded"])
        v1, v2 = make_version(), make_version()
        group = DeviceGroup.objects.create(name="live-rollout")
        for i in range(6):
            device = Device.objects.create(
                name=f"live-{i}", status="online", running_version=v1, desired_version=v1
            )
            device.groups.add(group)
        rollout = rollout_create(
            actor=None,
            data={
                "version": v2.pk,
                "target_group": group.pk,
                "waves": [{"count": 2, "soak_s": 0}, {"percent": 100, "soak_s": 0}],
            },
        )
        rollout_start(rollout_id=rollout.pk, actor=None)
        first = list(RolloutDevice.objects.filter(rollout=rollout).select_related("device"))
        assert len(first) == 2
        for member in first:
            report(member.device, "active")
        rollouts_advance.delay()  # the periodic task, run by the worker process
        _wait(
            lambda: Rollout.objects.get(pk=rollout.pk).current_wave == 1,
            timeout=60,
            what="wave 2",
            stack=live_stack,
        )
        rest = RolloutDevice.objects.filter(rollout=rollout, state="in_progress").select_related("device")
        assert rest.count() == 4
        for member in rest:
            report(member.device, "active")
        rollouts_advance.delay()
        _wait(
            lambda: Rollout.objects.get(pk=rollout.pk).status == "succeeded",
            timeout=60,
            what="success",
            stack=live_stack,
        )
        assert Device.objects.filter(groups=group, running_version=v2).count() == 6
        _wait(
            lambda: WebhookDelivery.objects.filter(
                event_type="rollout.succeeded", status="delivered"
            ).exists(),
            timeout=60,
            what="webhook delivery",
            stack=live_stack,
        )
        headers, body = receiver.requests[-1]
        assert headers["X-Flotilla-Event"] == "rollout.succeeded"
        assert webhook_verify(
            secret=SECRET,
            timestamp=headers["X-Flotilla-Timestamp"],
            body=body,
            signature=headers["X-Flotilla-Signature"],
        )
    finally:
        receiver.close()
