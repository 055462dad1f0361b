"""Deployments: one attempt to bring a device to a model version, and the states it reports.

Every change of state is announced as the domain event ``deployment.state_changed``
(after commit); a new deployment as ``deployment.opened``, which nudges the device.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.db import transaction
from django.utils import timezone

from core.api import ConflictError, NotFoundError, ServiceError
from core.events import emit
from fleet.models import Deployment, DeploymentEvent, Device

OPEN_STATES = [s.value for s in Deployment.State if s not in Deployment.TERMINAL]
REPORTABLE_STATES = frozenset(s.value for s in Deployment.State if s != Deployment.State.SUPERSEDED)


def deployment_state_changed(*, deployment_id: int, device_id: Any, old_state: str, new_state: str) -> None:
    """Announce a deployment's new state (delivered to subscribers after commit)."""
    emit(
        "deployment.state_changed",
        {
            "deployment_id": deployment_id,
            "device_id": str(device_id),
            "old_state": old_state,
            "new_state": new_state,
        },
    )


def deployments_supersede(*, device: Device, version_id: int | None = None) -> int:
    """Mark the device's open deployments (of ``version_id`` only, when given) superseded.

    Each change is announced as ``deployment.state_changed``; returns how many there were.
    """
    rows = Deployment.objects.filter(device=device, state__in=OPEN_STATES)
    if version_id is not None:
        rows = rows.filter(version_id=version_id)
    superseded = list(rows.values_list("id", "state"))
    if superseded:
        Deployment.objects.filter(id__in=[pk for pk, _ in superseded]).update(
            state=Deployment.State.SUPERSEDED, updated_at=timezone.now()
        )
        for pk, old in superseded:
            deployment_state_changed(
                deployment_id=pk, device_id=device.pk, old_state=old, new_state=Deployment.State.SUPERSEDED
            )
    return len(superseded)


def deployment_open(
    *,
    device: Device,
    version_id: int,
    origin_type: str = "",
    origin_id: int | None = None,
    nudge: bool = True,
    rollback: bool = False,
) -> Deployment:
    """The open deployment of `device` to `version_id`, created if missing.

    Open deployments to other versions are superseded: a device works on one at a time.
    A new deployment nudges the device's agent to heartbeat now (after commit), unless
    the caller is the heartbeat itself, whose answer already carries it. `rollback` marks
    it as sending the device back to a version it ran before (rollbacks and restores
    only): the one case in which the agent accepts an older version of the family.
    """
    with transaction.atomic():
        existing = (
            Deployment.objects.filter(device=device, version_id=version_id, state__in=OPEN_STATES)
            .order_by("-id")
            .first()
        )
        if existing is not None:
            if rollback and not existing.rollback:
                Deployment.objects.filter(pk=existing.pk).update(rollback=True)
                existing.rollback = True
            return existing
        deployments_supersede(device=device)
        deployment = Deployment.objects.create(
            device=device,
            version_id=version_id,
            origin_type=origin_type,
            origin_id=origin_id,
            rollback=rollback,
        )
        DeploymentEvent.objects.create(deployment=deployment, state=Deployment.State.PENDING)
        Device.objects.filter(pk=device.pk).update(deployment_state=Deployment.State.PENDING)
        device.deployment_state = Deployment.State.PENDING
        deployment_state_changed(
            deployment_id=deployment.pk, device_id=device.pk, old_state="", new_state=Deployment.State.PENDING
        )
        emit(
            "deployment.opened",
            {
                "deployment_id": deployment.pk,
                "device_id": str(device.pk),
                "version_id": version_id,
                "nudge": nudge,
            },
        )
    return deployment


def deployment_record_status(
    *,
    device: Device,
    deployment_id: int,
    state: str,
    message: str = "",
    detail: dict[str, Any] | None = None,
    reported_at: datetime | None = None,
) -> Deployment:
    """Record a state the device reported for its own deployment.

    Repeating the current state is a no-op (agents retry); leaving a terminal state is a
    conflict. `active` makes the version the running one and keeps the old one as the
    rollback target; `failed` and `rolled_back` point the desired version back at the
    running one, so the device is not asked to retry the same failing update forever
    (a rollout or an operator assigns again when they mean it).
    """
    if state not in REPORTABLE_STATES:
        raise ServiceError(f"Unknown deployment state {state!r}.", code="validation_error")
    with transaction.atomic():
        deployment = Deployment.objects.select_for_update().filter(pk=deployment_id, device=device).first()
        if deployment is None:
            raise NotFoundError("No such deployment for this device.", code="not_found")
        old = deployment.state
        if old == state:
            return deployment
        if old in Deployment.TERMINAL:
            raise ConflictError(
                f"Deployment {deployment_id} is already {old}.",
                code="deployment_closed",
                details={"state": old},
            )
        DeploymentEvent.objects.create(
            deployment=deployment, state=state, message=message, detail=detail or {}, reported_at=reported_at
        )
        deployment.state = state
        fields = ["state", "updated_at"]
        if state == Deployment.State.FAILED or state == Deployment.State.ROLLED_BACK:
            deployment.error = message
            fields.append("error")
        if detail:
            deployment.detail = {**deployment.detail, **detail}
            fields.append("detail")
        deployment.save(update_fields=fields)

        fresh = Device.objects.select_for_update().get(pk=device.pk)
        changes: dict[str, Any] = {"deployment_state": state}
        if state == Deployment.State.ACTIVE:
            if fresh.running_version_id != deployment.version_id:
                changes["previous_version_id"] = fresh.running_version_id
            changes["running_version_id"] = deployment.version_id
        elif state in (Deployment.State.FAILED, Deployment.State.ROLLED_BACK):
            if fresh.desired_version_id == deployment.version_id:
                changes["desired_version_id"] = fresh.running_version_id
        Device.objects.filter(pk=device.pk).update(**changes)
        for key, value in changes.items():
            setattr(device, key, value)
        deployment_state_changed(
            deployment_id=deployment.pk, device_id=device.pk, old_state=old, new_state=state
        )
    return deployment
