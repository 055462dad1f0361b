"""What `make demo` puts in the database before and after the simulated fleet starts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

DEMO_GROUP = "demo-fleet"
DEMO_FAMILY = "digits-mlp"


def seed_fleet(*, devices: int, actor: Any) -> dict[str, str]:
    """The demo group with a permissive update policy, and a token its agents enroll with."""
    from django.utils import timezone

    from fleet.models import DeviceGroup, UpdatePolicy
    from fleet.services.enrollment import enrollment_token_create

    policy, _ = UpdatePolicy.objects.get_or_create(
        name="demo",
        defaults={
            "description": "Updates any time; training allowed.",
            "training": {"allowed": True},
            "health_latency_budget_ms": 250.0,
        },
    )
    group, _ = DeviceGroup.objects.get_or_create(
        name=DEMO_GROUP, defaults={"description": "The simulated fleet"}
    )
    if group.policy_id is None:
        group.policy = policy
        group.save(update_fields=["policy"])
    # Agents that enrolled in an earlier run keep their credentials in their state
    # directories; the token is only for the ones enrolling now.
    _, secret = enrollment_token_create(
        actor=actor,
        name="demo fleet",
        group=group,
        tags=["demo", "simulated"],
        max_uses=max(devices, 1) * 2,
        expires_at=timezone.now() + timedelta(days=1),
    )
    return {"enrollment_token": secret, "group": DEMO_GROUP}


def _assign_model_and_train(*, devices: int, group_name: str, say: Callable[[str], None]) -> None:
    from django.db import close_old_connections

    from fleet.models import Device
    from fleet.services.devices import device_assign_version
    from models_registry.models import ModelVersion
    from training.models import FederatedJob
    from training.services import demo_job_start

    version = (
        ModelVersion.objects.filter(family__name=DEMO_FAMILY, stage="production").order_by("-number").first()
    )
    if version is None:
        say("no production version of the demo model; skipping the model push")
        return
    wanted = max(2, (devices * 3) // 4)
    deadline = time.monotonic() + 180
    job_started = FederatedJob.objects.filter(status__in=["running", "paused"]).exists()
    while time.monotonic() < deadline:
        close_old_connections()
        members = Device.objects.filter(groups__name=group_name).exclude(status="decommissioned")
        # Every device of the demo group that has no model yet gets the seeded one,
        # including those that enroll late.
        for device_id in members.filter(desired_version__isnull=True).values_list("pk", flat=True):
            device_assign_version(actor=None, device_id=device_id, version_id=version.pk)
        online = members.filter(status="online").count()
        if not job_started and online >= wanted:
            job = demo_job_start(family_name=DEMO_FAMILY, group_name=group_name)
            job_started = True
            say(
                f"{online} devices online: started federated job {job.pk}; "
                "watch the accuracy climb on the Federated page"
            )
        if job_started and members.filter(desired_version__isnull=True).count() == 0 and online >= devices:
            return
        time.sleep(3)


def start_federated_job_when_online(*, devices: int, group_name: str, say: Callable[[str], None]) -> None:
    """In the background: push the seeded model to the fleet, then start federated training."""

    def run() -> None:
        try:
            _assign_model_and_train(devices=devices, group_name=group_name, say=say)
        except Exception as exc:  # the demo keeps running; the operator sees why
            say(f"demo set-up step failed: {exc!r}")

    threading.Thread(target=run, name="demo-seed", daemon=True).start()
