"""Group releases: the version a device group stands at, and what a board joining it gets.

A group's release (``DeviceGroup.release_version``) is set when a rollout aimed at the
group succeeds (``rollout_succeeded`` below, called by the rollout engine), or by an
operator through ``group_release_set`` (the API's ``POST device-groups/<id>/release/``
and the group page). Setting a release moves no device: the group's members got the
version from the rollout, and an operator who wants them moved starts one. What the
release decides is what a board gets when it *joins* the group later: at enrollment (the
token's group and tags), when provisioned (the provisioner enrolls it with a token), or
when its tags or static groups change. ``device_release_apply`` then makes the release
the device's desired version through the deployment service manual assignment uses
(``deployment_open``, origin ``release`` and the group's id), with an audit entry and the
device's ``deployment.opened`` event.

Editing a group (its release, or a ``tag_selector`` that brings devices in) moves no
device either: applied to a whole group at once, that would be a deployment without the
waves and gates of a rollout.

Precedence: an active rollout or a running experiment comes before a group release. A
device in the target of a running or paused rollout, or assigned to an arm of a running
experiment, is left alone (the rollout or experiment brings it where it should be). A
device in several groups with releases gets the release set most recently. A release its
group may no longer take (the version was archived or rejected since) is skipped, never
forced: ``fleet.services.stages`` gates a release like any other assignment, when it is
set and again when it is applied. A board that cannot run the version's ONNX graph
(`fleet.rollouts.compat`: its ONNX Runtime or RAM, as it reported them) keeps what it
runs, as a rollout would hold it back (audited ``device.release_held`` with the reason).

When a succeeded rollout is rolled back, the groups it released fall back to the release
they had before it (``rollout_rolled_back``).
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.utils import timezone

from core.api import ConflictError, NotFoundError, ServiceError
from core.audit.services import actor_label, audit_record
from core.events import emit
from fleet.models import Deployment, Device, DeviceGroup, GroupReleaseChange
from fleet.rollouts.compat import cannot_run, explain
from fleet.selectors.devices import device_group_ids
from fleet.services.deployments import deployment_open
from fleet.services.shipping import onnx_facts
from fleet.services.stages import check_deployable

__all__ = [
    "ORIGIN",
    "any_group_released",
    "device_release_apply",
    "group_release_set",
    "group_releases_revert",
    "rollout_rolled_back",
    "rollout_succeeded",
]

log = logging.getLogger(__name__)

ORIGIN = "release"
MAX_REASON = 500


def _change(
    *,
    group: DeviceGroup,
    version: Any,
    actor: Any,
    reason: str,
    origin_type: str,
    origin_id: int | None,
    remote_addr: str | None,
) -> DeviceGroup:
    """Write a new release on the locked ``group``: the row, its history, audit and event."""
    previous_id = group.release_version_id
    group.release_version = version
    group.release_set_at = timezone.now()
    group.release_set_by = actor_label(actor)
    group.release_reason = reason
    group.save(update_fields=["release_version", "release_set_at", "release_set_by", "release_reason"])
    version_id = version.pk if version is not None else None
    GroupReleaseChange.objects.create(
        group=group,
        version_id=version_id,
        previous_version_id=previous_id,
        origin_type=origin_type,
        origin_id=origin_id,
        actor=group.release_set_by,
        reason=reason,
    )
    data = {
        "version": version_id,
        "previous_version": previous_id,
        "origin_type": origin_type,
        "origin_id": origin_id,
        "reason": reason,
    }
    audit_record(
        actor=actor, action="device_group.release_set", target=group, data=data, remote_addr=remote_addr
    )
    emit(
        "group.release_set",
        {
            "group_id": group.pk,
            "group": group.name,
            "version_id": version_id,
            "previous_version_id": previous_id,
            "origin_type": origin_type,
            "origin_id": origin_id,
            "reason": reason,
        },
    )
    return group


def _version(version_id: int) -> Any:
    from models_registry.models import ModelVersion

    version = ModelVersion.objects.select_related("family").filter(pk=version_id).first()
    if version is None:
        raise ServiceError(f"No model version {version_id}.", code="validation_error")
    return version


def group_release_set(
    *,
    actor: Any,
    group_id: int,
    version_id: int | None,
    reason: str = "",
    remote_addr: str | None = None,
) -> DeviceGroup:
    """An operator sets (or, with ``version_id=None``, clears) a group's release.

    The version must be one the group may take (``check_deployable``: production, or
    staging for a canary group; 409 ``version_stage_not_allowed`` / ``version_rejected``).
    Setting the release the group already has changes nothing and records nothing.
    """
    reason = (reason or "").strip()
    if len(reason) > MAX_REASON:
        raise ServiceError(f"reason must be at most {MAX_REASON} characters.", code="validation_error")
    with transaction.atomic():
        group = DeviceGroup.objects.select_for_update().filter(pk=group_id).first()
        if group is None:
            raise NotFoundError("No such device group.", code="not_found")
        version = _version(version_id) if version_id is not None else None
        if version is not None:
            check_deployable(version=version, canary=group.canary, target=_target(group))
        if group.release_version_id == version_id:
            return group
        return _change(
            group=group,
            version=version,
            actor=actor,
            reason=reason or ("cleared by operator" if version is None else "set by operator"),
            origin_type="operator",
            origin_id=None,
            remote_addr=remote_addr,
        )


def _target(group: DeviceGroup) -> str:
    return f"group {group.name}" + (" (a canary group)" if group.canary else " (not a canary group)")


def _cannot_run(*, device: Device, version: Any) -> str:
    """Why the board cannot run the version's ONNX graph, in words ("" when it can)."""
    try:
        opset, size = onnx_facts(version)
    except ServiceError as exc:
        return exc.message
    facts = {"status": device.status, "ram_mb": device.ram_mb, "hardware": device.hardware}
    code = cannot_run(facts=facts, opset=opset, onnx_bytes=size)
    return explain(code, opset=opset, onnx_bytes=size) if code else ""


def rollout_succeeded(*, rollout: Any) -> DeviceGroup | None:
    """Make a succeeded rollout's version the release of its target group, if it has one.

    Called inside the rollout engine's transaction. A rollout aimed only at tags or
    devices names no group and sets no release. The stage was checked when the rollout
    started; it is checked again here, and a version that may no longer go to the group
    leaves the release as it was (logged), rather than failing the rollout's success.
    """
    if rollout.target_group_id is None:
        return None
    group = DeviceGroup.objects.select_for_update().filter(pk=rollout.target_group_id).first()
    if group is None or group.release_version_id == rollout.version_id:
        return group
    version = _version(rollout.version_id)
    try:
        check_deployable(version=version, canary=group.canary, target=_target(group))
    except ConflictError as exc:
        log.warning("rollout %s succeeded but its version is not released to %s: %s", rollout.pk, group, exc)
        return group
    return _change(
        group=group,
        version=version,
        actor=None,
        reason=f"rollout {rollout.name or rollout.pk} succeeded",
        origin_type="rollout",
        origin_id=rollout.pk,
        remote_addr=None,
    )


def rollout_rolled_back(*, rollout: Any, actor: Any = None) -> list[DeviceGroup]:
    """Groups a rolled-back rollout had released go back to the release they had before it.

    Only while the rollout's release is still the group's: a release set since (by an
    operator or another rollout) stays.
    """
    restored = []
    changes = GroupReleaseChange.objects.filter(origin_type="rollout", origin_id=rollout.pk).order_by("-id")
    for change in changes:
        group = DeviceGroup.objects.select_for_update().filter(pk=change.group_id).first()
        if group is None or group.release_version_id != change.version_id:
            continue
        previous = _version(change.previous_version_id) if change.previous_version_id else None
        restored.append(
            _change(
                group=group,
                version=previous,
                actor=actor,
                reason=f"rollout {rollout.name or rollout.pk} rolled back",
                origin_type="rollout",
                origin_id=rollout.pk,
                remote_addr=None,
            )
        )
    return restored


def group_releases_revert(*, version_id: int, actor: Any, reason: str, origin_id: int) -> list[DeviceGroup]:
    """Every group whose release is ``version_id`` goes back to the release it had before.

    The previous release is the one this version replaced (the group's last change that
    set it); a group that had none is cleared. Called by ``fleet.services.revert`` inside
    its transaction; the change's origin is ``revert`` and the decision's id.
    """
    changed = []
    for group in DeviceGroup.objects.select_for_update().filter(release_version_id=version_id).order_by("pk"):
        change = GroupReleaseChange.objects.filter(group=group, version_id=version_id).order_by("-id").first()
        previous_id = change.previous_version_id if change is not None else None
        previous = _version(previous_id) if previous_id and previous_id != version_id else None
        changed.append(
            _change(
                group=group,
                version=previous,
                actor=actor,
                reason=reason,
                origin_type="revert",
                origin_id=origin_id,
                remote_addr=None,
            )
        )
    return changed


def any_group_released() -> bool:
    """Whether any group has a release (most fleets' enrollments then skip the rest)."""
    return DeviceGroup.objects.filter(release_version__isnull=False).exists()


def _held(device: Device) -> str:
    """Why an active rollout or a running experiment holds the device, or ""."""
    from fleet.models import Experiment, ExperimentAssignment
    from fleet.selectors.rollouts import devices_in_active_rollouts

    rollout_id = devices_in_active_rollouts().get(str(device.pk))
    if rollout_id is not None:
        return f"rollout {rollout_id}"
    experiment_id = (
        ExperimentAssignment.objects.filter(device=device, experiment__status=Experiment.Status.RUNNING)
        .values_list("experiment_id", flat=True)
        .first()
    )
    return f"experiment {experiment_id}" if experiment_id is not None else ""


def device_release_apply(
    *, device: Device, trigger: str, joined_group_ids: set[int] | None = None
) -> Deployment | None:
    """Give a device that joined groups the release of the newest-released of them.

    ``joined_group_ids``: the groups the device just joined (None: all its groups, as at
    enrollment); a group it was already in decides nothing new. Returns the deployment
    opened, or None when nothing was to do: no joined group has a release, the device is
    decommissioned, held by an active rollout or a running experiment, already runs or
    is already headed for the release, or the release may not go to it (stages).
    Runs inside the caller's transaction.
    """
    if device.status == Device.Status.DECOMMISSIONED or not any_group_released():
        return None
    groups = device_group_ids(device=device)
    if joined_group_ids is not None:
        groups &= joined_group_ids
    if not groups:
        return None
    group = (
        DeviceGroup.objects.filter(pk__in=groups, release_version__isnull=False)
        .select_related("release_version__family")
        .order_by("-release_set_at", "-id")
        .first()
    )
    if group is None or group.release_version is None:
        return None
    version = group.release_version
    if device.desired_version_id == version.pk or (
        device.desired_version_id is None and device.running_version_id == version.pk
    ):
        return None
    held = _held(device)
    if held:
        log.info("device %s joined %s but %s holds it; release not applied", device.pk, group, held)
        return None
    if device.running_version_id != version.pk:
        try:
            check_deployable(version=version, canary=group.canary, target=_target(group))
        except ConflictError as exc:
            log.warning("release of %s not applied to device %s: %s", group, device.pk, exc)
            return None
        reason = _cannot_run(device=device, version=version)
        if reason:
            # The board stays on what it runs, as a rollout would hold it back.
            log.warning("release of %s not applied to device %s: %s", group, device.pk, reason)
            audit_record(
                actor=None,
                action="device.release_held",
                target=device,
                data={"group": group.pk, "version": version.pk, "trigger": trigger, "reason": reason},
            )
            return None
    with transaction.atomic():
        Device.objects.filter(pk=device.pk).update(desired_version_id=version.pk)
        device.desired_version_id = version.pk
        deployment = None
        if device.running_version_id != version.pk:
            deployment = deployment_open(
                device=device, version_id=version.pk, origin_type=ORIGIN, origin_id=group.pk
            )
            deployment.detail = {
                **deployment.detail,
                "release": {"group": group.pk, "group_name": group.name, "trigger": trigger},
            }
            deployment.save(update_fields=["detail"])
        audit_record(
            actor=None,
            action="device.release_applied",
            target=device,
            data={
                "group": group.pk,
                "version": version.pk,
                "trigger": trigger,
                "deployment": deployment.pk if deployment else None,
            },
        )
    return deployment
