"""Operator writes on devices: edit, assign a version, decommission; and offline detection."""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from core.api import NotFoundError, ServiceError
from core.audit.services import audit_record
from core.events import emit
from fleet.models import Deployment, Device, DeviceGroup, UpdatePolicy
from fleet.selectors.devices import device_canary_groups, device_group_ids
from fleet.services.deployments import (
    deployment_open,
    deployments_supersede,
)
from fleet.services.liveness import LivenessUnavailable, liveness_flush
from fleet.services.releases import any_group_released, device_release_apply
from fleet.services.stages import check_deployable

log = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:=/-]{0,63}$")


def tags_validate(*, tags: Any) -> list[str]:
    """A clean tag list, or a ServiceError naming the first bad tag."""
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ServiceError("tags must be a list of strings.", code="validation_error")
    if len(tags) > 50:
        raise ServiceError("At most 50 tags.", code="validation_error")
    for tag in tags:
        if not TAG_PATTERN.match(tag):
            raise ServiceError(
                f"Invalid tag {tag!r}: letters, digits and _.:=/- only, at most 64 characters.",
                code="validation_error",
            )
    return list(dict.fromkeys(tags))


def _get(device_id: Any) -> Device:
    device = Device.objects.select_for_update().filter(pk=device_id).first()
    if device is None:
        raise NotFoundError("No such device.", code="not_found")
    return device


def device_update(
    *,
    actor: Any,
    device_id: Any,
    name: str | None = None,
    tags: list[str] | None = None,
    group_ids: list[int] | None = None,
    set_policy: bool = False,
    policy_id: int | None = None,
    remote_addr: str | None = None,
) -> Device:
    """Change a device's name, tags, static groups or (with `set_policy`) its policy; None clears it."""
    with transaction.atomic():
        device = _get(device_id)
        # Only groups with a release care which groups a device joins.
        released = (tags is not None or group_ids is not None) and any_group_released()
        groups_before = device_group_ids(device=device) if released else set()
        fields: list[str] = []
        audit: dict[str, Any] = {}
        if name is not None:
            if not name.strip() or len(name) > 150:
                raise ServiceError("name must be 1..150 characters.", code="validation_error")
            device.name = name.strip()
            fields.append("name")
            audit["name"] = device.name
        if tags is not None:
            device.tags = tags_validate(tags=tags)
            fields.append("tags")
            audit["tags"] = device.tags
        if set_policy:
            if policy_id is not None and not UpdatePolicy.objects.filter(pk=policy_id).exists():
                raise ServiceError(f"No update policy {policy_id}.", code="validation_error")
            device.policy_id = policy_id
            fields.append("policy")
            audit["policy"] = policy_id
        if fields:
            device.save(update_fields=fields)
        if group_ids is not None:
            groups = list(DeviceGroup.objects.filter(pk__in=group_ids))
            missing = set(group_ids) - {g.pk for g in groups}
            if missing:
                raise ServiceError(f"No device group {sorted(missing)[0]}.", code="validation_error")
            device.groups.set(groups)
            audit["groups"] = sorted(group_ids)
        audit_record(actor=actor, action="device.update", target=device, data=audit, remote_addr=remote_addr)
        if released:
            # Groups the device just joined (by tags or statically) may give it their release.
            joined = device_group_ids(device=device) - groups_before
            if joined:
                device_release_apply(device=device, trigger="groups_changed", joined_group_ids=joined)
    return device


def device_assign_version(
    *,
    actor: Any,
    device_id: Any,
    version_id: int,
    rollback: bool = False,
    remote_addr: str | None = None,
) -> Deployment | None:
    """Make `version_id` the device's desired version (a manual update).

    The agent refuses a version of its family older than the one it runs unless the
    deployment is an explicit `rollback` (the operator going back on purpose).

    Opens a pending deployment unless the device already runs that version. A version
    the device does not run must be one it may take (`fleet.services.stages`): in
    production, or in staging when the device belongs to a canary group; else 409
    `version_stage_not_allowed` or `version_rejected`. The version it runs is always
    allowed: pinning it installs nothing and is how a pending update is called off.
    """
    from models_registry.models import ModelVersion

    with transaction.atomic():
        device = _get(device_id)
        if device.status == Device.Status.DECOMMISSIONED:
            raise ServiceError("The device is decommissioned.", code="device_decommissioned", status_code=409)
        version = ModelVersion.objects.select_related("family").filter(pk=version_id).first()
        if version is None:
            raise ServiceError(f"No model version {version_id}.", code="validation_error")
        if device.running_version_id != version.pk:
            canaries = device_canary_groups(device=device)
            check_deployable(
                version=version,
                canary=bool(canaries),
                target=f"device {device.name}"
                + (f" (in canary group {canaries[0]})" if canaries else " (in no canary group)"),
            )
        Device.objects.filter(pk=device.pk).update(desired_version_id=version_id)
        device.desired_version_id = version_id
        deployment = None
        if device.running_version_id != version_id:
            deployment = deployment_open(
                device=device, version_id=version_id, origin_type="manual", rollback=rollback
            )
        audit_record(
            actor=actor,
            action="device.assign_version",
            target=device,
            data={
                "version": version_id,
                "deployment": deployment.pk if deployment else None,
                "rollback": rollback,
            },
            remote_addr=remote_addr,
        )
    return deployment


def device_decommission(*, actor: Any, device_id: Any, remote_addr: str | None = None) -> Device:
    """Retire a device: its secret stops working at once and its open deployments close."""
    with transaction.atomic():
        device = _get(device_id)
        if device.status != Device.Status.DECOMMISSIONED:
            device.secret_hash = None
            device.status = Device.Status.DECOMMISSIONED
            device.decommissioned_at = timezone.now()
            device.save(update_fields=["secret_hash", "status", "decommissioned_at"])
            deployments_supersede(device=device)
        audit_record(actor=actor, action="device.decommission", target=device, remote_addr=remote_addr)
    return device


def devices_mark_offline(*, now: Any = None) -> int:
    """Mark offline every online device that missed `OFFLINE_AFTER_MISSED` heartbeats.

    The liveness buffer is flushed first (``fleet.services.liveness``), so a board whose
    latest heartbeats are still in Redis counts as seen; when the buffer cannot be read,
    no device is marked this time. Then one UPDATE; the interval is the device's own
    policy's, else the default. Running it twice is harmless: the second run finds no
    online device past its deadline.
    """
    try:
        liveness_flush()
    except LivenessUnavailable as exc:
        log.warning("offline marking skipped: the liveness buffer is unavailable (%s)", exc)
        return 0
    now = now or timezone.now()
    missed = settings.OFFLINE_AFTER_MISSED
    default_cutoff = now - timedelta(seconds=settings.HEARTBEAT_INTERVAL_S * missed)
    custom = list(
        UpdatePolicy.objects.filter(heartbeat_interval_s__isnull=False)
        .values_list("heartbeat_interval_s", flat=True)
        .distinct()
    )
    late = Q(policy__heartbeat_interval_s__isnull=True, last_seen__lt=default_cutoff) | Q(
        policy__isnull=True, last_seen__lt=default_cutoff
    )
    for interval in custom:
        late |= Q(
            policy__heartbeat_interval_s=interval,
            last_seen__lt=now - timedelta(seconds=interval * missed),
        )
    marked = Device.objects.filter(late, status=Device.Status.ONLINE).update(status=Device.Status.OFFLINE)
    if marked:
        emit("devices.offline", {"devices": marked})
    return marked


__all__ = [
    "device_assign_version",
    "device_decommission",
    "device_update",
    "devices_mark_offline",
    "tags_validate",
]
