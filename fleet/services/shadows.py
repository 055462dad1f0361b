"""Shadow deployments: devices run a candidate version beside their active one.

``shadow_start`` names a candidate (a version with an ONNX graph, in a stage its target
may take: ``check_deployable``, as for a deployment) and its devices (a group's members
at the start, or explicit ids) with a policy: ``sample_rate`` in [0, 1], and optionally
``max_cpu_percent`` (of one core) and ``budget_ms`` (shadow time per application
prediction). The heartbeat answer then carries ``shadow`` (``wire.ShadowModel``), with
the candidate's ONNX reference signed for that version and kind ``onnx``; the agent
runs it on sampled live inputs and reports ``shadow_*`` metrics tagged with the
candidate's id, which ``metrics_ingest`` accepts from the members. A device is in at most
one running shadow: a newer one takes it over. ``shadow_stop`` ends it.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from core.api import ConflictError, NotFoundError, ServiceError
from core.audit.services import audit_record
from core.events import emit
from fleet.models import Device, DeviceGroup, Shadow, ShadowMember
from fleet.selectors.devices import device_canary_groups
from fleet.selectors.rollouts import target_devices
from fleet.services.stages import check_deployable

__all__ = ["MAX_DEVICE_IDS", "shadow_start", "shadow_start_for_rollout", "shadow_stop"]

MAX_DEVICE_IDS = 1000
MAX_REASON = 500
RUNNING_CACHE_KEY = "fleet:shadows:running"


def _invalid(message: str, field: str) -> ServiceError:
    return ServiceError(message, code="validation_error", details={"field": field})


def _check_policy(
    *, sample_rate: float, max_cpu_percent: float | None, budget_ms: float | None, tolerance: float
) -> None:
    if not 0.0 <= float(sample_rate) <= 1.0:
        raise _invalid("sample_rate must be between 0 and 1.", "sample_rate")
    if max_cpu_percent is not None and not 0.0 < float(max_cpu_percent) <= 100.0:
        raise _invalid("max_cpu_percent must be above 0 and at most 100.", "max_cpu_percent")
    if budget_ms is not None and not 0.0 < float(budget_ms) <= 600_000.0:
        raise _invalid("budget_ms must be above 0 and at most 600000.", "budget_ms")
    if not 0.0 <= float(tolerance) <= 1e9:
        raise _invalid("tolerance must be between 0 and 1e9.", "tolerance")


def _forget_cached_members() -> None:
    from fleet.services.heartbeat import hot_cache_forget

    # This process's heartbeats see the change at once; others within the cache's TTL.
    transaction.on_commit(lambda: hot_cache_forget(key=RUNNING_CACHE_KEY))


def _payload(shadow: Shadow, devices: int) -> dict[str, Any]:
    return {
        "shadow_id": shadow.pk,
        "version_id": shadow.version_id,
        "status": shadow.status,
        "devices": devices,
        "sample_rate": shadow.sample_rate,
        "reason": shadow.reason,
    }


def shadow_start(
    *,
    actor: Any,
    version_id: int,
    group_id: int | None = None,
    device_ids: list[str] | None = None,
    sample_rate: float = 1.0,
    max_cpu_percent: float | None = None,
    budget_ms: float | None = None,
    tolerance: float = 0.0,
    reason: str = "",
    remote_addr: str | None = None,
) -> Shadow:
    """Start shadowing ``version_id`` on a group's members or the devices named.

    400 ``validation_error`` for a bad policy, both or neither target, unknown devices or
    an empty target; 409 ``version_stage_not_allowed`` / ``version_rejected`` for a
    version its target may not take (a draft never), 409 ``no_onnx`` for a version with
    no ONNX graph yet.
    """
    from models_registry.models import ModelVersion

    _check_policy(
        sample_rate=sample_rate, max_cpu_percent=max_cpu_percent, budget_ms=budget_ms, tolerance=tolerance
    )
    reason = (reason or "").strip()
    if len(reason) > MAX_REASON:
        raise _invalid(f"reason must be at most {MAX_REASON} characters.", "reason")
    if (group_id is None) == (not device_ids):
        raise _invalid("Name either a group or device_ids.", "group")
    if device_ids and len(device_ids) > MAX_DEVICE_IDS:
        raise _invalid(f"At most {MAX_DEVICE_IDS} device_ids.", "device_ids")
    version = ModelVersion.objects.select_related("family").filter(pk=version_id).first()
    if version is None:
        raise _invalid(f"No model version {version_id}.", "version")
    with transaction.atomic():
        group: DeviceGroup | None = None
        if group_id is not None:
            group = DeviceGroup.objects.filter(pk=group_id).first()
            if group is None:
                raise NotFoundError("No such device group.", code="not_found")
            check_deployable(
                version=version,
                canary=group.canary,
                target=f"group {group.name}" + (" (a canary group)" if group.canary else ""),
            )
            devices = list(target_devices(group=group))
        else:
            ids = sorted({str(d) for d in device_ids or []})
            devices = list(Device.objects.filter(pk__in=ids).exclude(status=Device.Status.DECOMMISSIONED))
            missing = sorted(set(ids) - {str(d.pk) for d in devices})
            if missing:
                raise ServiceError(
                    f"No such device: {missing[0]}.", code="validation_error", details={"device_ids": missing}
                )
            for device in devices:
                canaries = device_canary_groups(device=device)
                check_deployable(
                    version=version,
                    canary=bool(canaries),
                    target=f"device {device.name}"
                    + (f" (in canary group {canaries[0]})" if canaries else " (in no canary group)"),
                )
        if not devices:
            raise _invalid("The target has no devices.", "group")
        shadow = _shadow_create(
            actor=actor,
            version=version,
            group=group,
            devices=devices,
            sample_rate=sample_rate,
            max_cpu_percent=max_cpu_percent,
            budget_ms=budget_ms,
            tolerance=tolerance,
            reason=reason,
            remote_addr=remote_addr,
        )
    return shadow


def _shadow_create(
    *,
    actor: Any,
    version: Any,
    group: DeviceGroup | None,
    devices: list[Device],
    sample_rate: float,
    max_cpu_percent: float | None,
    budget_ms: float | None,
    tolerance: float,
    reason: str,
    remote_addr: str | None,
) -> Shadow:
    from models_registry.models import Artifact

    if not Artifact.objects.filter(version=version, kind="onnx").exists():
        raise ConflictError(
            f"{version.label} has no ONNX graph yet, which is what a board runs in shadow.",
            code="no_onnx",
            details={"version": version.pk},
        )
    shadow = Shadow.objects.create(
        version=version,
        group=group,
        sample_rate=float(sample_rate),
        max_cpu_percent=None if max_cpu_percent is None else float(max_cpu_percent),
        budget_ms=None if budget_ms is None else float(budget_ms),
        tolerance=float(tolerance),
        reason=reason,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
    )
    # A device shadows one candidate at a time: a newer shadow takes it over.
    ShadowMember.objects.filter(device__in=devices, active=True).update(active=False)
    ShadowMember.objects.bulk_create(
        [ShadowMember(shadow=shadow, device=d) for d in devices], batch_size=1000
    )
    audit_record(
        actor=actor,
        action="shadow.start",
        target=shadow,
        data={
            "version": version.pk,
            "group": group.pk if group else None,
            "devices": len(devices),
            "sample_rate": shadow.sample_rate,
            "max_cpu_percent": shadow.max_cpu_percent,
            "budget_ms": shadow.budget_ms,
            "tolerance": shadow.tolerance,
        },
        remote_addr=remote_addr,
    )
    emit("shadow.started", _payload(shadow, len(devices)))
    _forget_cached_members()
    return shadow


def shadow_start_for_rollout(
    *, rollout: Any, device_ids: list[str], sample_rate: float, actor: Any
) -> Shadow:
    """The shadow phase of a rollout (``fleet.rollouts.shadow_gate``): its candidate on the
    target devices that can run it, whose version and stage the rollout already checked."""
    devices = list(Device.objects.filter(pk__in=device_ids).exclude(status=Device.Status.DECOMMISSIONED))
    if not devices:
        raise ServiceError("The target has no devices to shadow the candidate on.", code="empty_target")
    return _shadow_create(
        actor=actor,
        version=rollout.version,
        group=rollout.target_group,
        devices=devices,
        sample_rate=sample_rate,
        max_cpu_percent=None,
        budget_ms=None,
        tolerance=0.0,
        reason=f"shadow phase of rollout {rollout.name or rollout.pk}"[:MAX_REASON],
        remote_addr=None,
    )


def shadow_stop(*, actor: Any, shadow_id: int, reason: str = "", remote_addr: str | None = None) -> Shadow:
    """Stop a shadow: its devices drop the candidate on their next heartbeat. Idempotent."""
    reason = (reason or "").strip()
    if len(reason) > MAX_REASON:
        raise _invalid(f"reason must be at most {MAX_REASON} characters.", "reason")
    with transaction.atomic():
        shadow = Shadow.objects.select_for_update().filter(pk=shadow_id).first()
        if shadow is None:
            raise NotFoundError("No such shadow.", code="not_found")
        if shadow.status == Shadow.Status.STOPPED:
            return shadow
        shadow.status = Shadow.Status.STOPPED
        shadow.stopped_at = timezone.now()
        if reason:
            shadow.reason = reason
        shadow.save(update_fields=["status", "stopped_at", "reason"])
        devices = ShadowMember.objects.filter(shadow=shadow).count()
        ShadowMember.objects.filter(shadow=shadow, active=True).update(active=False)
        audit_record(
            actor=actor, action="shadow.stop", target=shadow, data={"reason": reason}, remote_addr=remote_addr
        )
        emit("shadow.stopped", _payload(shadow, devices))
        _forget_cached_members()
    return shadow
