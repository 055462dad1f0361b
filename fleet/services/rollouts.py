"""Staged rollouts: create, start, pause, resume, abort, roll back, and the periodic advance.

How a rollout moves (`rollout_advance`, run every few seconds by `fleet.rollouts_advance`):

1. Members of the current wave are synced from their deployments: `active` -> succeeded;
   `failed`/`rolled_back` -> retried after `retry_backoff_s * 2**(attempt-1)` while
   attempts remain, else failed; still in progress after `in_progress_timeout_s` ->
   failed (`timeout`). A device that goes offline mid-wave therefore counts as not yet
   succeeded until its timeout, then as failed.
2. Queued members are told to install (desired_version set, deployment opened) while
   fewer than `max_concurrent_downloads` are in progress and, if the rollout respects
   them, only inside their policy's maintenance window.
3. Error threshold: more than `error_threshold_share` of the exposed devices failed, or
   `error_threshold_count` failed, whichever comes first -> the gate-failure action.
4. Metric gates over the soak window (see `fleet.rollouts.gates`) are evaluated on every
   tick once enough devices have enough samples, so a bad version is stopped as soon as
   the evidence is there; each device casts one vote (its own p95, error rate, accuracy
   or mae) and the gate reads the median, against a baseline from the rollout's own
   devices on the replaced version; a failed gate -> `on_gate_failure` (pause, or roll
   every exposed device back to the version it ran before).
5. After `soak_s`, with at least `success_threshold` of the exposed devices active and
   every gate passed, the next wave opens; after the last one the rollout succeeded.

Every decision is a `RolloutDecision` row with the numbers behind it.

Overlap rule: a device may be in the target of only one running or paused rollout; a
rollout whose target shares a device with one is refused (409 `overlapping_rollout`)
on create and on start. Drafts, finished rollouts and other targets do not count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from core.api import ConflictError, NotFoundError, ServiceError
from core.audit.services import actor_label, audit_record
from core.dispatch import enqueue_on_commit
from core.events import emit
from fleet.models import (
    Deployment,
    Device,
    DeviceGroup,
    Experiment,
    ExperimentAssignment,
    Rollout,
    RolloutDecision,
    RolloutDevice,
)
from fleet.rollouts.gates import (
    GATE_METRICS,
    evaluate_gates,
    gates_for_task,
    gates_not_for_task,
    percentile_metrics_for,
    raw_metrics_for,
    validate_gates,
)
from fleet.rollouts.policy import in_maintenance_window
from fleet.rollouts.shadow_gate import validate_shadow_policy
from fleet.rollouts.waves import cumulative_size, ordered_devices, validate_waves
from fleet.selectors.devices import device_effective_policy
from fleet.selectors.rollouts import (
    device_metric_stats,
    devices_in_active_rollouts,
    rollout_target_ids,
    target_devices,
)
from fleet.services.control import (
    control_judge,
    control_release,
    rollout_configure_control,
    wave_target_ids,
)
from fleet.services.deployments import (
    deployment_open,
    deployments_supersede,
)
from fleet.services.releases import rollout_rolled_back, rollout_succeeded
from fleet.services.shadows import shadow_start_for_rollout, shadow_stop
from fleet.services.stages import check_deployable
from fleet.services.transitions import Step, transition

ORIGIN = "rollout"
_EDITABLE = (
    "name",
    "success_threshold",
    "error_threshold_share",
    "error_threshold_count",
    "on_gate_failure",
    "max_concurrent_downloads",
    "max_retries",
    "retry_backoff_s",
    "in_progress_timeout_s",
    "respect_maintenance_windows",
)


def _decide(
    rollout: Rollout,
    *,
    action: str,
    reason: str = "",
    metrics: dict[str, Any] | None = None,
    actor: Any = None,
) -> RolloutDecision:
    return RolloutDecision.objects.create(
        rollout=rollout,
        wave=rollout.current_wave,
        action=action,
        reason=reason,
        metrics=metrics or {},
        actor=actor_label(actor),
    )


def _event(rollout: Rollout, event_type: str, **extra: Any) -> None:
    emit(
        event_type,
        {
            "rollout_id": rollout.pk,
            "name": rollout.name,
            "version_id": rollout.version_id,
            "status": rollout.status,
            "wave": rollout.current_wave,
            "reason": rollout.status_reason,
            **extra,
        },
    )


def _has_onnx(version_id: int) -> bool:
    from models_registry.models import Artifact

    return Artifact.objects.filter(version_id=version_id, kind=Artifact.Kind.ONNX).exists()


def _check_overlap(*, device_ids: list[str], rollout_id: int | None) -> None:
    held = devices_in_active_rollouts(exclude_rollout_id=rollout_id)
    clash = [d for d in device_ids if d in held]
    if clash:
        other = held[clash[0]]
        raise ConflictError(
            f"{len(clash)} target device(s) are already in running or paused rollout {other}; "
            "a device may be in only one active rollout at a time.",
            code="overlapping_rollout",
            details={"rollout_id": other, "devices": clash[:20], "count": len(clash)},
        )
    in_experiment = list(
        ExperimentAssignment.objects.filter(
            experiment__status=Experiment.Status.RUNNING, device_id__in=device_ids
        ).values_list("experiment_id", "device_id")[:20]
    )
    if in_experiment:
        raise ConflictError(
            f"Target devices are in running experiment {in_experiment[0][0]}.",
            code="overlapping_experiment",
            details={"experiment_id": in_experiment[0][0], "devices": [str(d) for _, d in in_experiment]},
        )


def target_stage_rule(
    *, group: DeviceGroup | None, tags: list[str], device_ids: list[str]
) -> tuple[bool, str]:
    """Whether a rollout target may take staging versions, and its name for messages.

    Only a target that is exactly one canary group may: tags or device ids added to it
    could reach any device.
    """
    if group is not None and group.canary and not tags and not device_ids:
        return True, f"canary group {group.name}"
    if group is not None and group.canary:
        return False, f"a target adding tags or devices to canary group {group.name}"
    if group is not None:
        return False, f"group {group.name} (not a canary group)"
    return False, "a target of tags or devices (not a canary group)"


def _check_version_stage(
    *, version: Any, group: DeviceGroup | None, tags: list[str], device_ids: list[str]
) -> None:
    canary, label = target_stage_rule(group=group, tags=tags, device_ids=device_ids)
    check_deployable(version=version, canary=canary, target=label)


def check_gates_fit(*, gates: list[dict[str, Any]], task: str, what: str = "gate") -> None:
    """Refuse gates that read another task's feedback (400 ``gate_not_for_task``)."""
    unfit = gates_not_for_task(gates=gates, task=task)
    if unfit:
        fits = list(gates_for_task(task))
        raise ServiceError(
            f"The {what} metric {', '.join(repr(m) for m in unfit)} does not fit a {task} family; "
            f"{what}s for {task}: {', '.join(fits)}.",
            code="gate_not_for_task",
            details={"task": task, "metrics": unfit, "fits": fits},
        )


def rollout_create(*, actor: Any, data: dict[str, Any], remote_addr: str | None = None) -> Rollout:
    """Validate and save a draft rollout.

    `data`: `version` (id), a target (`target_group` id, `target_tags`, `target_device_ids`;
    their union), `waves`, optional `gates` and the tuning fields of `Rollout`. Refused with
    400 `empty_target`, `no_compatible_artifact`, `unknown_metric`, `gate_not_for_task` (an
    `accuracy` gate on a regression family, an `mae` gate on a classification one),
    `validation_error`, or 409 `overlapping_rollout`, `version_stage_not_allowed` (a
    version not in production, unless it is in staging and the target is exactly one
    canary group) or `version_rejected` (`fleet.services.stages`).
    """
    from models_registry.models import ModelVersion

    version_id = str(data.get("version", ""))
    version = (
        ModelVersion.objects.select_related("family").filter(pk=int(version_id)).first()
        if version_id.isdigit()
        else None
    )
    if version is None:
        raise ServiceError(
            "Unknown model version.", code="validation_error", details={"version": data.get("version")}
        )
    if not _has_onnx(version.pk):
        raise ServiceError(
            f"{version.label} has no ONNX artifact, which is what devices install.",
            code="no_compatible_artifact",
            details={"version": version.pk},
        )
    try:
        waves = validate_waves(waves=data.get("waves") or [{"percent": 100, "soak_s": 0}])
    except ValueError as exc:
        raise ServiceError(str(exc), code="validation_error", details={"waves": str(exc)}) from exc
    try:
        gates = validate_gates(gates=data.get("gates") or [])
    except KeyError as exc:
        raise ServiceError(
            f"Unknown gate metric {exc.args[0]!r}.",
            code="unknown_metric",
            details={"metric": exc.args[0], "known": list(GATE_METRICS)},
        ) from exc
    except ValueError as exc:
        raise ServiceError(str(exc), code="validation_error", details={"gates": str(exc)}) from exc
    check_gates_fit(gates=gates, task=version.family.task)
    try:
        shadow_policy = validate_shadow_policy(data.get("shadow"))
    except ValueError as exc:
        raise ServiceError(str(exc), code="validation_error", details={"shadow": str(exc)}) from exc

    group = None
    if data.get("target_group") is not None:
        group = DeviceGroup.objects.filter(pk=data["target_group"]).first()
        if group is None:
            raise ServiceError(
                "Unknown device group.",
                code="validation_error",
                details={"target_group": data["target_group"]},
            )
    tags = [str(t) for t in data.get("target_tags") or []]
    explicit = [str(d) for d in data.get("target_device_ids") or []]
    devices = [
        str(pk)
        for pk in target_devices(group=group, tags=tags, device_ids=explicit).values_list("pk", flat=True)
    ]
    if not devices:
        raise ServiceError("The target selects no devices.", code="empty_target")
    _check_version_stage(version=version, group=group, tags=tags, device_ids=explicit)

    fields: dict[str, Any] = {k: data[k] for k in _EDITABLE if data.get(k) is not None}
    if fields.get("on_gate_failure", "pause") not in Rollout.OnGateFailure.values:
        raise ServiceError("on_gate_failure must be pause or rollback.", code="validation_error")
    for key in ("success_threshold", "error_threshold_share"):
        if key in fields and not 0 <= float(fields[key]) <= 1:
            raise ServiceError(f"{key} must be between 0 and 1.", code="validation_error")
    with transaction.atomic():
        _check_overlap(device_ids=devices, rollout_id=None)
        rollout = Rollout.objects.create(
            version=version,
            target_group=group,
            target_tags=tags,
            target_device_ids=explicit,
            waves=waves,
            gates=gates,
            origin=data.get("origin") or {},
            held_back={str(k): str(v) for k, v in (data.get("held_back") or {}).items()},
            shadow_policy=shadow_policy,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
            **fields,
        )
        if not rollout.name:
            rollout.name = f"{version.label} rollout {rollout.pk}"
            rollout.save(update_fields=["name"])
        # A control cohort (optional) is seeded by the rollout's id, so it is chosen here.
        control = rollout_configure_control(rollout=rollout, data=data, task=version.family.task)
        created = {"target_devices": len(devices), "held_back": len(rollout.held_back or {})}
        _decide(rollout, action="created", metrics={**created, **control}, actor=actor)
        audit_record(
            actor=actor, action="rollout.create", target=rollout, data={**data}, remote_addr=remote_addr
        )
    return rollout


def _lock(rollout_id: int) -> Rollout:
    rollout = Rollout.objects.select_for_update().filter(pk=rollout_id).first()
    if rollout is None:
        raise NotFoundError("No such rollout.", code="not_found")
    return rollout


def _require(rollout: Rollout, *statuses: str) -> None:
    if rollout.status not in statuses:
        raise ConflictError(
            f"Rollout {rollout.pk} is {rollout.status}; this needs {' or '.join(statuses)}.",
            code="invalid_state",
            details={"status": rollout.status},
        )


def _open_wave(rollout: Rollout, now: datetime) -> dict[str, Any]:
    """Add the devices the current wave covers (late joiners included) as queued members."""
    # Control and held-back devices never join a wave (`fleet.services.control`).
    target = wave_target_ids(rollout=rollout, target=rollout_target_ids(rollout=rollout))
    order = ordered_devices(rollout_id=rollout.pk, device_ids=target)
    size = cumulative_size(wave=rollout.waves[rollout.current_wave], total=len(order))
    wanted = order[:size]
    known = set(
        str(d) for d in RolloutDevice.objects.filter(rollout=rollout).values_list("device_id", flat=True)
    )
    held = devices_in_active_rollouts(exclude_rollout_id=rollout.pk)
    added = skipped = already = 0
    versions = dict(
        Device.objects.filter(pk__in=[d for d in wanted if d not in known]).values_list(
            "pk", "running_version_id"
        )
    )
    for device_id in wanted:
        if device_id in known:
            continue
        if device_id in held:
            # A device that joined the target while another active rollout holds it.
            skipped += 1
            continue
        running = versions.get(_uuid(device_id))
        member = RolloutDevice(
            rollout=rollout, device_id=device_id, wave=rollout.current_wave, previous_version_id=running
        )
        if running == rollout.version_id:
            member.state = RolloutDevice.State.SUCCEEDED
            member.finished_at = now
            already += 1
        RolloutDevice.objects.create(
            **{f.name: getattr(member, f.name) for f in RolloutDevice._meta.concrete_fields if f.name != "id"}
        )
        added += 1
    return {
        "target": len(order),
        "wave_size": size,
        "added": added,
        "already_on_version": already,
        "skipped_held": skipped,
    }


def _uuid(device_id: str) -> Any:
    import uuid

    return uuid.UUID(device_id)


def _release(rollout: Rollout, now: datetime) -> int:
    """Tell queued members to install, within the download limit and maintenance windows."""
    in_progress = RolloutDevice.objects.filter(rollout=rollout, state=RolloutDevice.State.IN_PROGRESS).count()
    limit = rollout.max_concurrent_downloads
    slots = None if not limit else max(0, limit - in_progress)
    if slots == 0:
        return 0
    queued = (
        RolloutDevice.objects.filter(rollout=rollout, state=RolloutDevice.State.QUEUED)
        .select_related("device")
        .order_by("wave", "id")
    )
    released = 0
    for member in queued:
        if slots is not None and released >= slots:
            break
        if member.next_retry_at is not None and member.next_retry_at > now:
            continue
        device = member.device
        if device.status == Device.Status.DECOMMISSIONED:
            member.state = RolloutDevice.State.CANCELLED
            member.error = "decommissioned"
            member.finished_at = now
            member.save(update_fields=["state", "error", "finished_at"])
            continue
        if rollout.respect_maintenance_windows:
            policy = device_effective_policy(device=device)
            doc = (
                {"timezone": policy.timezone, "maintenance_windows": policy.maintenance_windows}
                if policy
                else None
            )
            if not in_maintenance_window(policy=doc, now=now):
                continue
        Device.objects.filter(pk=device.pk).update(desired_version_id=rollout.version_id)
        device.desired_version_id = rollout.version_id
        deployment = deployment_open(
            device=device, version_id=rollout.version_id, origin_type=ORIGIN, origin_id=rollout.pk
        )
        member.state = RolloutDevice.State.IN_PROGRESS
        member.deployment = deployment
        member.attempts += 1
        member.attempt_started_at = now
        member.next_retry_at = None
        member.save(update_fields=["state", "deployment", "attempts", "attempt_started_at", "next_retry_at"])
        released += 1
    return released


def _sync(rollout: Rollout, now: datetime) -> dict[str, int]:
    """Bring in-progress members up to date with what their devices reported."""
    changes = {"succeeded": 0, "failed": 0, "retrying": 0, "timed_out": 0}
    members = list(
        RolloutDevice.objects.filter(rollout=rollout, state=RolloutDevice.State.IN_PROGRESS).select_related(
            "deployment", "device"
        )
    )
    timeout = timedelta(seconds=rollout.in_progress_timeout_s)
    for member in members:
        device = member.device
        deployment = member.deployment
        state = deployment.state if deployment is not None else ""
        if state == Deployment.State.SUPERSEDED or deployment is None:
            # Someone (the heartbeat, an operator) opened another deployment to the same
            # version: follow the newest one.
            newer = (
                Deployment.objects.filter(
                    device=device,
                    version_id=rollout.version_id,
                    created_at__gte=member.attempt_started_at or now,
                )
                .order_by("-id")
                .first()
            )
            if newer is not None:
                member.deployment = newer
                state = newer.state
        if state == Deployment.State.ACTIVE or (
            device.running_version_id == rollout.version_id
            and device.deployment_state == Deployment.State.ACTIVE
        ):
            member.state = RolloutDevice.State.SUCCEEDED
            member.ever_active = True
            member.finished_at = now
            member.error = ""
            changes["succeeded"] += 1
        elif state in (Deployment.State.FAILED, Deployment.State.ROLLED_BACK):
            error = (member.deployment.error if member.deployment else "") or state
            if member.attempts <= rollout.max_retries:
                member.state = RolloutDevice.State.QUEUED
                delay = rollout.retry_backoff_s * (2 ** max(0, member.attempts - 1))
                member.next_retry_at = now + timedelta(seconds=delay)
                member.error = f"attempt {member.attempts}: {error}"
                changes["retrying"] += 1
            else:
                member.state = RolloutDevice.State.FAILED
                member.finished_at = now
                member.error = f"attempt {member.attempts}: {error}"
                changes["failed"] += 1
        elif member.attempt_started_at is not None and now - member.attempt_started_at > timeout:
            member.state = RolloutDevice.State.FAILED
            member.finished_at = now
            member.error = (
                f"timeout: not active within {rollout.in_progress_timeout_s:g}s (device {device.status})"
            )
            changes["timed_out"] += 1
        else:
            continue
        member.save(
            update_fields=["state", "ever_active", "finished_at", "error", "next_retry_at", "deployment"]
        )
    return changes


def _stats(rollout: Rollout) -> dict[str, Any]:
    counts = {s: 0 for s in RolloutDevice.State.values}
    for state in RolloutDevice.objects.filter(rollout=rollout).values_list("state", flat=True):
        counts[state] += 1
    exposed = sum(counts.values()) - counts[RolloutDevice.State.CANCELLED]
    return {
        "exposed": exposed,
        **counts,
        "success_share": counts["succeeded"] / exposed if exposed else 0.0,
        "failed_share": counts["failed"] / exposed if exposed else 0.0,
    }


def _gate_samples(rollout: Rollout, now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    """Per-device figures the gates judge.

    Candidate: the new version on the rollout's members since the wave started. Baseline:
    the versions it replaces (the members' previous versions and what the rest of the
    target runs) on the rollout's own devices (its members and its target), over the same
    window and one as long before it, so the last wave, when few devices still run the old
    version, still has a baseline: its members' figures from before they switched. Metrics
    a device outside the rollout reports for the replaced version never count.
    """
    start = rollout.wave_started_at or now
    members = RolloutDevice.objects.filter(rollout=rollout)
    target = target_devices(
        group=rollout.target_group, tags=rollout.target_tags or [], device_ids=rollout.target_device_ids or []
    )
    replaced = {
        v
        for v in [
            *members.values_list("previous_version_id", flat=True),
            *target.order_by().values_list("running_version_id", flat=True).distinct(),
        ]
        if v and v != rollout.version_id
    }
    names = raw_metrics_for(rollout.gates)
    p95_of = percentile_metrics_for(rollout.gates)
    candidate = device_metric_stats(
        version_ids=[rollout.version_id],
        since=start,
        until=now + timedelta(seconds=1),
        devices=members.values("device_id"),
        names=names,
        p95_of=p95_of,
    )
    span = max(now - start, timedelta(seconds=float(rollout.waves[rollout.current_wave].get("soak_s", 0))))
    own = Device.objects.filter(Q(pk__in=members.values("device_id")) | Q(pk__in=target.values("pk")))
    baseline = (
        device_metric_stats(
            version_ids=replaced,
            since=start - span,
            until=now + timedelta(seconds=1),
            devices=own.values("pk"),
            names=names,
            p95_of=p95_of,
        )
        if replaced
        else {}
    )
    return candidate, baseline


def _rollback(rollout: Rollout, now: datetime) -> int:
    """Point every member back at the version it ran before; cancel queued ones."""
    rolled = 0
    for member in RolloutDevice.objects.filter(rollout=rollout).select_related("device"):
        if member.state == RolloutDevice.State.QUEUED:
            member.state = RolloutDevice.State.CANCELLED
            member.finished_at = now
            member.save(update_fields=["state", "finished_at"])
            continue
        if member.state in (RolloutDevice.State.CANCELLED, RolloutDevice.State.ROLLED_BACK):
            continue
        if (
            member.state == RolloutDevice.State.FAILED
            and member.device.running_version_id != rollout.version_id
        ):
            continue  # the device already went back by itself
        _send_back(member.device, member.previous_version_id, rollout, now)
        member.state = RolloutDevice.State.ROLLED_BACK
        member.finished_at = now
        member.save(update_fields=["state", "finished_at"])
        rolled += 1
    return rolled


def _send_back(device: Device, version_id: int | None, rollout: Rollout, now: datetime) -> None:
    """Make `version_id` the device's desired version again.

    None (the device ran no model before) clears the desired version: the agent keeps
    what it runs, having nothing to go back to, and the heartbeat stops offering the new one.
    """
    fresh = Device.objects.get(pk=device.pk)
    if version_id is None:
        Device.objects.filter(pk=fresh.pk, desired_version_id=rollout.version_id).update(
            desired_version_id=None
        )
        deployments_supersede(device=fresh, version_id=rollout.version_id)
        return
    Device.objects.filter(pk=fresh.pk).update(desired_version_id=version_id)
    fresh.desired_version_id = version_id
    if fresh.running_version_id == version_id:
        # Never got the new version: just stop the download.
        deployments_supersede(device=fresh, version_id=rollout.version_id)
    else:
        # deployment_open supersedes the open deployment to the new version.
        deployment_open(
            device=fresh, version_id=version_id, origin_type=ORIGIN, origin_id=rollout.pk, rollback=True
        )


def _fail_wave(rollout: Rollout, now: datetime, *, why: str, numbers: dict[str, Any]) -> str:
    if rollout.on_gate_failure == Rollout.OnGateFailure.ROLLBACK:
        numbers["rolled_back_devices"] = _rollback(rollout, now)
        rollout.status = Rollout.Status.ROLLED_BACK
        rollout.finished_at = now
        action, event = "rolled_back", "rollout.rolled_back"
    else:
        rollout.status = Rollout.Status.PAUSED
        action, event = "paused", "rollout.paused"
    rollout.status_reason = why
    rollout.revision += 1
    rollout.save(update_fields=["status", "status_reason", "finished_at", "revision"])
    _decide(rollout, action=action, reason=why, metrics=numbers)
    _event(rollout, event, metrics=numbers)
    # The version's family policy: alert, or revert it on every device (fleet.services.revert
    # imports this module, hence the import here).
    from fleet.services.revert import rollout_gate_failed

    if rollout_gate_failed(rollout=rollout, why=why, numbers=numbers):
        action = "rolled_back"
    return action


class _LostRace(Exception):
    """Another advance changed the rollout first; this one must change nothing."""


def _next_wave(
    rollout: Rollout, now: datetime, *, action: str, reason: str, numbers: dict[str, Any], actor: Any = None
) -> str:
    old_revision = rollout.revision
    last = rollout.current_wave >= len(rollout.waves) - 1
    if last:
        updated = Rollout.objects.filter(pk=rollout.pk, revision=old_revision).update(
            status=Rollout.Status.SUCCEEDED, finished_at=now, revision=old_revision + 1, status_reason=""
        )
        if updated != 1:
            raise _LostRace
        rollout.refresh_from_db()
        # The version becomes the target group's release: what boards joining it get.
        group = rollout_succeeded(rollout=rollout)
        # The control cohort stayed on the incumbent while the waves ran; it gets the version now.
        if rollout.control_percent > 0:
            numbers = {**numbers, "control_released": control_release(rollout=rollout, now=now)}
        if group is not None and group.release_version_id == rollout.version_id:
            numbers = {**numbers, "released_to_group": group.pk}
        _decide(rollout, action="succeeded", reason=reason, metrics=numbers, actor=actor)
        _event(rollout, "rollout.succeeded", metrics=numbers)
        return "succeeded"
    # Recorded against the wave that passed; a lost race below rolls it back with the rest.
    _decide(rollout, action=action, reason=reason, metrics=numbers, actor=actor)
    # The conditional update is the guard against a duplicated or concurrent advance:
    # only the caller that saw the current revision moves the wave.
    updated = Rollout.objects.filter(pk=rollout.pk, revision=old_revision).update(
        current_wave=rollout.current_wave + 1, wave_started_at=now, revision=old_revision + 1
    )
    if updated != 1:
        raise _LostRace
    rollout.refresh_from_db()
    opened = _open_wave(rollout, now)
    released = _release(rollout, now)
    _decide(rollout, action="wave_started", metrics={**opened, "released": released})
    _event(rollout, "rollout.wave_started", metrics=opened)
    return action


@dataclass
class AdvanceResult:
    """What one `rollout_advance` call did."""

    rollout_id: int
    action: str
    wave: int = -1
    stats: dict[str, Any] = field(default_factory=dict)


def rollout_advance(*, rollout_id: int, now: datetime | None = None) -> AdvanceResult:
    """One step of a running rollout; idempotent and safe to run concurrently or twice.

    The rollout row is locked with `SELECT ... FOR UPDATE SKIP LOCKED` (a second caller
    returns at once with action "busy"); on databases without row locks (SQLite) the
    write transaction serialises callers, and the wave change itself is a conditional
    update on `revision`, so a duplicate can never open the same wave twice or skip one.
    """
    now = now or timezone.now()
    try:
        with transaction.atomic():
            rollout = Rollout.objects.select_for_update(skip_locked=True).filter(pk=rollout_id).first()
            if rollout is None:
                return AdvanceResult(rollout_id, "busy")
            if rollout.status == Rollout.Status.SHADOW:
                return _shadow_phase_judge(rollout, now)
            if rollout.status == Rollout.Status.SUCCEEDED:
                # The control cohort got the version as the last wave passed: follow its
                # installs (and retries) to the end, as for any member.
                settled = _sync(rollout, now)
                settled["released"] = _release(rollout, now)
                return AdvanceResult(rollout_id, "settling", rollout.current_wave, settled)
            if rollout.status != Rollout.Status.RUNNING:
                return AdvanceResult(rollout_id, "not_running", rollout.current_wave)
            return _advance_locked(rollout, now)
    except _LostRace:
        return AdvanceResult(rollout_id, "lost_race")


def _advance_locked(rollout: Rollout, now: datetime) -> AdvanceResult:
    synced = _sync(rollout, now)
    # Late joiners whose rank falls inside the waves already opened join now.
    joined = _open_wave(rollout, now)["added"]
    released = _release(rollout, now)
    stats = _stats(rollout)
    stats.update({"synced": synced, "released": released, "late_joiners": joined})
    wave = rollout.waves[rollout.current_wave]
    exposed = stats["exposed"]

    over_share = exposed > 0 and stats["failed"] / exposed > rollout.error_threshold_share
    over_count = (
        rollout.error_threshold_count is not None and stats["failed"] >= rollout.error_threshold_count
    )
    if over_share or over_count:
        why = (
            f"{stats['failed']} of {exposed} devices failed "
            f"(error threshold {rollout.error_threshold_share:.0%}"
            + (
                f" or {rollout.error_threshold_count} devices"
                if rollout.error_threshold_count is not None
                else ""
            )
            + ")"
        )
        action = _fail_wave(rollout, now, why=why, numbers={"error_threshold": True, **stats})
        return AdvanceResult(rollout.pk, action, rollout.current_wave, stats)

    gate_verdict, gate_results = "passed", []
    if rollout.gates:
        candidate, baseline = _gate_samples(rollout, now)
        gate_verdict, results = evaluate_gates(gates=rollout.gates, candidate=candidate, baseline=baseline)
        gate_results = [r.as_dict() for r in results]
        stats["gates"] = gate_results
        if gate_verdict == "failed":
            failed = [r for r in results if r.outcome == "failed"]
            why = "metric gate failed: " + "; ".join(r.reason for r in failed)
            action = _fail_wave(rollout, now, why=why, numbers=stats)
            return AdvanceResult(rollout.pk, action, rollout.current_wave, stats)
    control_verdict, control = control_judge(rollout=rollout, now=now)
    if control:
        stats["control"] = control
        if control_verdict == "failed":
            failed_gates = [g for g in control["gates"] if g["outcome"] == "failed"]
            why = "worse than the control cohort: " + "; ".join(g["reason"] for g in failed_gates)
            action = _fail_wave(rollout, now, why=why, numbers=stats)
            return AdvanceResult(rollout.pk, action, rollout.current_wave, stats)
        if control_verdict == "waiting" and gate_verdict == "passed":
            gate_verdict = "waiting"

    soaked = rollout.wave_started_at is None or now >= rollout.wave_started_at + timedelta(
        seconds=float(wave.get("soak_s", 0))
    )
    healthy = exposed > 0 and stats["success_share"] >= rollout.success_threshold
    if not (soaked and healthy):
        return AdvanceResult(rollout.pk, "waiting", rollout.current_wave, stats)
    if gate_verdict == "waiting":
        if not RolloutDecision.objects.filter(
            rollout=rollout, wave=rollout.current_wave, action="waiting_for_samples"
        ).exists():
            _decide(
                rollout,
                action="waiting_for_samples",
                reason="soak elapsed; gates need more samples",
                metrics=stats,
            )
        return AdvanceResult(rollout.pk, "waiting_for_samples", rollout.current_wave, stats)
    reason = f"wave {rollout.current_wave + 1} healthy: {stats['succeeded']}/{exposed} active, gates passed"
    action = _next_wave(rollout, now, action="wave_passed", reason=reason, numbers=stats)
    return AdvanceResult(rollout.pk, action, rollout.current_wave, stats)


def _transition(
    *,
    rollout_id: int,
    actor: Any,
    remote_addr: str | None,
    allowed: tuple[str, ...],
    audit_action: str,
    step: Callable[[Rollout], Step],
    audit_data: dict[str, Any] | None = None,
) -> Rollout:
    return transition(
        model=Rollout,
        pk=rollout_id,
        allowed=allowed,
        actor=actor,
        remote_addr=remote_addr,
        audit_action=audit_action,
        audit_data=audit_data,
        step=step,
        decide=_decide,
        announce=_event,
    )


def _shadow_phase_start(rollout: Rollout, *, target: list[str], actor: Any) -> Step:
    """Start the candidate in shadow on the target boards that can run it (control included:
    the shadow never answers their applications)."""
    held = set(rollout.held_back or {})
    devices = [d for d in target if d not in held]
    shadow = shadow_start_for_rollout(
        rollout=rollout,
        device_ids=devices,
        sample_rate=float(rollout.shadow_policy.get("sample_rate", 1.0)),
        actor=actor,
    )
    rollout.shadow = shadow
    rollout.status = Rollout.Status.SHADOW
    return Step(
        decision="shadow_started",
        event="rollout.started",
        fields=["status", "started_at", "shadow"],
        reason=f"the candidate runs in shadow on {len(devices)} devices before the first wave",
        metrics={"shadow": shadow.pk, "devices": len(devices), "policy": rollout.shadow_policy},
        event_extra={"metrics": {"shadow": shadow.pk, "devices": len(devices)}},
    )


def _shadow_phase_end(rollout: Rollout, *, reason: str) -> None:
    if rollout.status == Rollout.Status.SHADOW and rollout.shadow_id is not None:
        shadow_stop(actor=None, shadow_id=rollout.shadow_id, reason=reason[:500])


def _shadow_phase_judge(rollout: Rollout, now: datetime) -> AdvanceResult:
    """Judge a rollout's shadow (`fleet.rollouts.shadow_gate`); open the first wave when it
    passes, fail the rollout (and hand the version to its family's policy) when it fails."""
    from fleet.models import Shadow
    from fleet.selectors.shadows import shadow_phase_verdict

    policy = rollout.shadow_policy
    shadow = Shadow.objects.filter(pk=rollout.shadow_id).first() if rollout.shadow_id else None
    if shadow is None:
        numbers: dict[str, Any] = {"shadow": rollout.shadow_id}
        return _shadow_phase_stop(rollout, now, why="its shadow was deleted", numbers=numbers)
    verdict = shadow_phase_verdict(rollout=rollout, shadow=shadow, now=now)
    numbers = verdict.numbers
    if verdict.outcome == "waiting":
        if shadow.status == Shadow.Status.STOPPED:
            why = "its shadow was stopped before it had enough evidence"
            return _shadow_phase_stop(rollout, now, why=why, numbers=numbers)
        return AdvanceResult(rollout.pk, "waiting_for_shadow", rollout.current_wave, numbers)
    if verdict.outcome == "failed":
        why = f"failed in shadow: {verdict.reason}"
        shadow_stop(actor=None, shadow_id=shadow.pk, reason=why[:500])
        _shadow_phase_finish(rollout, now, status=Rollout.Status.FAILED, why=why)
        _decide(rollout, action="shadow_failed", reason=why, metrics=numbers)
        _event(rollout, "rollout.shadow_failed", metrics=numbers)
        from fleet.services.revert import rollout_shadow_failed

        rollout_shadow_failed(rollout=rollout, why=why, numbers=numbers)
        return AdvanceResult(rollout.pk, "shadow_failed", rollout.current_wave, numbers)
    if verdict.outcome == "timed_out" and policy.get("on_timeout") == "stop":
        return _shadow_phase_stop(rollout, now, why=f"no shadow verdict: {verdict.reason}", numbers=numbers)
    action = "shadow_passed" if verdict.outcome == "passed" else "shadow_inconclusive"
    reason = (
        verdict.reason if verdict.outcome == "passed" else f"no shadow verdict, waves open: {verdict.reason}"
    )
    shadow_stop(actor=None, shadow_id=shadow.pk, reason=f"{action}: {reason}"[:500])
    _decide(rollout, action=action, reason=reason, metrics=numbers)
    rollout.status = Rollout.Status.RUNNING
    rollout.current_wave = 0
    rollout.wave_started_at = now
    rollout.revision += 1
    rollout.save(update_fields=["status", "current_wave", "wave_started_at", "revision"])
    opened = _open_wave(rollout, now)
    released = _release(rollout, now)
    _decide(rollout, action="wave_started", metrics={**opened, "released": released})
    _event(rollout, "rollout.shadow_passed", metrics=numbers)
    _event(rollout, "rollout.wave_started", metrics=opened)
    return AdvanceResult(rollout.pk, action, rollout.current_wave, numbers)


def _shadow_phase_finish(rollout: Rollout, now: datetime, *, status: str, why: str) -> None:
    """End a rollout in its shadow phase: no wave ever opened, so nothing to send back."""
    rollout.status = status
    rollout.status_reason = why
    rollout.finished_at = now
    rollout.revision += 1
    rollout.save(update_fields=["status", "status_reason", "finished_at", "revision"])


def _shadow_phase_stop(
    rollout: Rollout, now: datetime, *, why: str, numbers: dict[str, Any]
) -> AdvanceResult:
    """No verdict to act on: the rollout stops before any device was touched."""
    _shadow_phase_end(rollout, reason=why)
    _shadow_phase_finish(rollout, now, status=Rollout.Status.ABORTED, why=why)
    _decide(rollout, action="shadow_inconclusive", reason=why, metrics=numbers)
    _event(rollout, "rollout.aborted", metrics=numbers)
    return AdvanceResult(rollout.pk, "aborted", rollout.current_wave, numbers)


def rollout_start(
    *, rollout_id: int, actor: Any, remote_addr: str | None = None, now: datetime | None = None
) -> Rollout:
    """Open the first wave of a draft rollout."""
    now = now or timezone.now()

    def step(rollout: Rollout) -> Step:
        target = rollout_target_ids(rollout=rollout)
        if not target:
            raise ServiceError("The target selects no devices.", code="empty_target")
        # Checked again: the version may have been archived, or the group's canary flag
        # cleared, since the draft was saved.
        _check_version_stage(
            version=rollout.version,
            group=rollout.target_group,
            tags=list(rollout.target_tags or []),
            device_ids=list(rollout.target_device_ids or []),
        )
        _check_overlap(device_ids=target, rollout_id=rollout.pk)
        rollout.started_at = now
        if rollout.shadow_policy:
            return _shadow_phase_start(rollout, target=target, actor=actor)
        rollout.status = Rollout.Status.RUNNING
        rollout.current_wave = 0
        rollout.wave_started_at = now
        opened = _open_wave(rollout, now)
        released = _release(rollout, now)
        return Step(
            decision="started",
            event="rollout.started",
            fields=["status", "current_wave", "wave_started_at", "started_at"],
            metrics={**opened, "released": released},
            event_extra={"metrics": opened},
        )

    rollout = _transition(
        rollout_id=rollout_id,
        actor=actor,
        remote_addr=remote_addr,
        allowed=(Rollout.Status.DRAFT,),
        audit_action="rollout.start",
        step=step,
    )
    _kick(rollout.pk)
    return rollout


def _kick(rollout_id: int) -> None:
    """Advance soon after commit instead of waiting for the next beat tick."""
    enqueue_on_commit("fleet.rollouts_advance_one", rollout_id)


def rollout_pause(
    *, rollout_id: int, actor: Any, reason: str = "", remote_addr: str | None = None
) -> Rollout:
    """Stop opening waves and releasing devices; downloads already told keep going."""

    def step(rollout: Rollout) -> Step:
        rollout.status = Rollout.Status.PAUSED
        rollout.status_reason = reason or "paused by operator"
        return Step(
            decision="paused",
            event="rollout.paused",
            fields=["status", "status_reason"],
            reason=rollout.status_reason,
            metrics=_stats(rollout),
        )

    return _transition(
        rollout_id=rollout_id,
        actor=actor,
        remote_addr=remote_addr,
        allowed=(Rollout.Status.RUNNING,),
        audit_action="rollout.pause",
        audit_data={"reason": reason},
        step=step,
    )


def rollout_resume(
    *, rollout_id: int, actor: Any, remote_addr: str | None = None, now: datetime | None = None
) -> Rollout:
    """Run again. The wave's soak window restarts, so gates judge fresh data only."""
    now = now or timezone.now()

    def step(rollout: Rollout) -> Step:
        rollout.status = Rollout.Status.RUNNING
        rollout.status_reason = ""
        rollout.wave_started_at = now
        return Step(
            decision="resumed",
            event="rollout.resumed",
            fields=["status", "status_reason", "wave_started_at"],
            metrics=_stats(rollout),
        )

    rollout = _transition(
        rollout_id=rollout_id,
        actor=actor,
        remote_addr=remote_addr,
        allowed=(Rollout.Status.PAUSED,),
        audit_action="rollout.resume",
        step=step,
    )
    _kick(rollout.pk)
    return rollout


def rollout_abort(
    *,
    rollout_id: int,
    actor: Any,
    reason: str = "",
    remote_addr: str | None = None,
    now: datetime | None = None,
) -> Rollout:
    """Stop for good. Devices not yet active go back to the version they run (their open
    deployment is superseded); devices already active keep the new version."""
    now = now or timezone.now()

    def step(rollout: Rollout) -> Step:
        _shadow_phase_end(rollout, reason=reason or "rollout aborted")
        _sync(rollout, now)
        cancelled = 0
        members = RolloutDevice.objects.filter(
            rollout=rollout, state__in=[RolloutDevice.State.QUEUED, RolloutDevice.State.IN_PROGRESS]
        ).select_related("device")
        for member in members:
            if member.state == RolloutDevice.State.IN_PROGRESS:
                device = Device.objects.get(pk=member.device_id)
                _send_back(device, device.running_version_id, rollout, now)
            member.state = RolloutDevice.State.CANCELLED
            member.finished_at = now
            member.error = "rollout aborted"
            member.save(update_fields=["state", "finished_at", "error"])
            cancelled += 1
        rollout.status = Rollout.Status.ABORTED
        rollout.status_reason = reason or "aborted by operator"
        rollout.finished_at = now
        return Step(
            decision="aborted",
            event="rollout.aborted",
            fields=["status", "status_reason", "finished_at"],
            reason=rollout.status_reason,
            metrics={**_stats(rollout), "cancelled": cancelled},
        )

    return _transition(
        rollout_id=rollout_id,
        actor=actor,
        remote_addr=remote_addr,
        allowed=(Rollout.Status.DRAFT, Rollout.Status.SHADOW, Rollout.Status.RUNNING, Rollout.Status.PAUSED),
        audit_action="rollout.abort",
        audit_data={"reason": reason},
        step=step,
    )


def rollout_rollback(
    *,
    rollout_id: int,
    actor: Any,
    reason: str = "",
    remote_addr: str | None = None,
    now: datetime | None = None,
) -> Rollout:
    """Send every device the rollout touched back to the version it ran before."""
    now = now or timezone.now()

    def step(rollout: Rollout) -> Step:
        _shadow_phase_end(rollout, reason=reason or "rollout rolled back")
        _sync(rollout, now)
        rolled = _rollback(rollout, now)
        # A succeeded rollout had released its version to its group: take that back too.
        rollout_rolled_back(rollout=rollout, actor=actor)
        rollout.status = Rollout.Status.ROLLED_BACK
        rollout.status_reason = reason or "rolled back by operator"
        rollout.finished_at = now
        return Step(
            decision="rolled_back",
            event="rollout.rolled_back",
            fields=["status", "status_reason", "finished_at"],
            reason=rollout.status_reason,
            metrics={"rolled_back_devices": rolled},
        )

    return _transition(
        rollout_id=rollout_id,
        actor=actor,
        remote_addr=remote_addr,
        allowed=(
            Rollout.Status.SHADOW,
            Rollout.Status.RUNNING,
            Rollout.Status.PAUSED,
            Rollout.Status.SUCCEEDED,
        ),
        audit_action="rollout.rollback",
        audit_data={"reason": reason},
        step=step,
    )


def rollout_advance_now(
    *, rollout_id: int, actor: Any, remote_addr: str | None = None, now: datetime | None = None
) -> Rollout:
    """Open the next wave at once, skipping the soak and gates of the current one."""
    now = now or timezone.now()
    try:
        with transaction.atomic():
            rollout = _lock(rollout_id)
            _require(rollout, Rollout.Status.RUNNING)
            _sync(rollout, now)
            stats = _stats(rollout)
            _next_wave(
                rollout, now, action="advanced_by_operator", reason="advance now", numbers=stats, actor=actor
            )
            audit_record(actor=actor, action="rollout.advance_now", target=rollout, remote_addr=remote_addr)
    except _LostRace as exc:
        raise ConflictError("The rollout changed meanwhile; try again.", code="conflict") from exc
    rollout.refresh_from_db()
    return rollout


def running_rollout_ids() -> list[int]:
    """Ids of the rollouts the periodic task advances: in shadow, running, and succeeded ones
    whose last members (the control cohort) are still installing."""
    unsettled = Q(
        status=Rollout.Status.SUCCEEDED,
        members__state__in=(RolloutDevice.State.QUEUED, RolloutDevice.State.IN_PROGRESS),
    )
    return list(
        Rollout.objects.filter(Q(status__in=(Rollout.Status.SHADOW, Rollout.Status.RUNNING)) | unsettled)
        .distinct()
        .order_by("id")
        .values_list("pk", flat=True)
    )
