"""Reverting a version everywhere, the watch after a rollout succeeded, and the family policy.

A version that fails a rollout's gate (or error threshold), or is flagged (``model.flagged``:
live accuracy or mae fell behind its evaluation) while *watched* — within its family's
``watch_s`` of a rollout of it succeeding — is handled by its family's policy
(``fleet.models.FamilyPolicy``, default ``alert``):

- ``alert``: a decision row (``VersionDecision``, action ``alerted``, with the numbers and how
  many devices run or desire the version), an audit entry and ``version.revert_recommended``.
  No device moves.
- ``revert``: ``version_revert`` below, the same thing an operator does with
  ``POST /api/v1/model-versions/<id>/revert/``.

``version_revert`` takes the version off every device running or desiring it, whichever way
it got there (a rollout, an experiment, a manual assignment, a group release):

1. running and paused rollouts of the version are rolled back (``rollout_rollback``: their
   members go to the version each ran before the rollout);
2. running experiments with an arm on the version are stopped (``experiment_stop``: their
   devices go back to what they ran before the experiment);
3. groups whose release is the version go back to their previous release;
4. every other device still on or headed to the version: one headed to it (not yet
   running it) is pointed back at what it runs and its download superseded; one running it
   gets a rollback deployment (``Deployment.rollback``, so the agent accepts the older
   version) to its previous version (``Device.previous_version``), or when it has none, to
   the previous release of one of its groups. A device with neither keeps what it runs and
   is counted (``devices_without_previous``), never forced.

All of it in one transaction, recorded as a decision with the metric values behind it,
audited (``model_version.revert``) and announced (``version.reverted``). Succeeded rollouts
keep their status: they did succeed; the decision says what came after. Reverting a
version nobody runs records a decision with zero devices.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from core.api import NotFoundError, ServiceError
from core.audit.services import actor_label, audit_record
from core.events import Event, emit
from fleet.models import (
    Device,
    Experiment,
    FamilyPolicy,
    GroupReleaseChange,
    Rollout,
    VersionDecision,
)
from fleet.selectors.devices import device_group_ids
from fleet.selectors.revert import family_policy, watching_rollout
from fleet.services.deployments import (
    deployment_open,
    deployments_supersede,
)
from fleet.services.experiments import experiment_stop
from fleet.services.releases import group_releases_revert
from fleet.services.rollouts import rollout_rollback

__all__ = [
    "ORIGIN",
    "family_policy_set",
    "model_flagged_received",
    "version_decision_record",
    "version_failed",
    "version_revert",
]

log = logging.getLogger(__name__)

ORIGIN = "revert"
MAX_REASON = 500
# Device ids kept on a decision row (the counts are always complete).
MAX_LISTED = 500
# A failed shadow phase's figures kept on the version's decision.
SHADOW_NUMBERS = ("metric", "median_difference", "voting_devices", "candidate", "active", "agreement")


def _version(version_id: int, *, lock: bool = False) -> Any:
    from models_registry.models import ModelVersion

    qs = ModelVersion.objects.select_related("family")
    if lock:
        qs = qs.select_for_update()
    version = qs.filter(pk=version_id).first()
    if version is None:
        raise NotFoundError(f"No model version {version_id}.", code="not_found")
    return version


def version_decision_record(
    *,
    version: Any,
    action: str,
    trigger: str,
    reason: str,
    metrics: dict[str, Any] | None = None,
    detail: dict[str, Any] | None = None,
    job_id: int | None = None,
    actor: Any = None,
) -> VersionDecision:
    """Store one decision about a version (training records its drift-started jobs here)."""
    return VersionDecision.objects.create(
        version=version,
        family_id=version.family_id,
        action=action,
        trigger=trigger,
        reason=reason,
        metrics=metrics or {},
        detail=detail or {},
        job_id=job_id,
        actor=actor_label(actor),
    )


def _group_previous(device: Device, version_id: int) -> int | None:
    """The release one of the device's groups had before ``version_id`` replaced it."""
    groups = device_group_ids(device=device)
    if not groups:
        return None
    change = (
        GroupReleaseChange.objects.filter(group_id__in=groups, version_id=version_id)
        .exclude(previous_version__isnull=True)
        .exclude(previous_version_id=version_id)
        .order_by("-id")
        .first()
    )
    return change.previous_version_id if change is not None else None


def _revert_device(device: Device, version_id: int, decision: VersionDecision) -> str:
    """Take one device off the version: "reverted", "stopped" (never ran it) or "nothing"."""
    if device.running_version_id != version_id:
        # Headed to the version, not yet running it: keep what it runs, stop the download.
        Device.objects.filter(pk=device.pk).update(desired_version_id=device.running_version_id)
        deployments_supersede(device=device, version_id=version_id)
        return "stopped"
    target = device.previous_version_id
    if target is None or target == version_id:
        target = _group_previous(device, version_id)
    if target is None:
        return "nothing"
    Device.objects.filter(pk=device.pk).update(desired_version_id=target)
    device.desired_version_id = target
    deployment = deployment_open(
        device=device, version_id=target, origin_type=ORIGIN, origin_id=decision.pk, rollback=True
    )
    deployment.detail = {**deployment.detail, "revert": {"decision": decision.pk, "from_version": version_id}}
    deployment.save(update_fields=["detail"])
    return "reverted"


def _on_version(version_id: int) -> Q:
    return Q(running_version_id=version_id) | Q(desired_version_id=version_id)


def version_revert(
    *,
    version_id: int,
    actor: Any,
    reason: str = "",
    trigger: str = VersionDecision.Trigger.OPERATOR,
    metrics: dict[str, Any] | None = None,
    remote_addr: str | None = None,
) -> VersionDecision:
    """Revert a version on every device running or desiring it (see the module's doc).

    Returns the decision: ``devices_reverted`` counts the devices that no longer run or
    head for the version (rollback deployments opened, or downloads stopped),
    ``devices_without_previous`` those that run it with nothing to go back to.
    """
    reason = (reason or "").strip()
    if len(reason) > MAX_REASON:
        raise ServiceError(f"reason must be at most {MAX_REASON} characters.", code="validation_error")
    with transaction.atomic():
        version = _version(version_id, lock=True)
        label = f"v{version.number} of {version.family.name}"
        reason = reason or ("reverted by operator" if trigger == VersionDecision.Trigger.OPERATOR else "")
        decision = version_decision_record(
            version=version,
            action=VersionDecision.Action.REVERTED,
            trigger=trigger,
            reason=reason,
            metrics=metrics,
            actor=actor,
        )
        on_version = Device.objects.filter(_on_version(version.pk)).exclude(
            status=Device.Status.DECOMMISSIONED
        )
        # Devices already headed elsewhere (an earlier revert, a newer assignment) are left
        # as they are and not counted again.
        leaving = set(
            on_version.exclude(desired_version_id=version.pk)
            .exclude(desired_version__isnull=True)
            .values_list("pk", flat=True)
        )
        affected = set(on_version.values_list("pk", flat=True)) - leaving
        why = f"{label} reverted: {reason}" if reason else f"{label} reverted"
        rollouts = list(
            Rollout.objects.filter(version_id=version.pk, status__in=Rollout.ACTIVE_STATUSES)
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        for rollout_id in rollouts:
            rollout_rollback(rollout_id=rollout_id, actor=actor, reason=why[:MAX_REASON])
        experiments = [
            e.pk
            for e in Experiment.objects.filter(status=Experiment.Status.RUNNING).order_by("pk")
            if any(int(arm.get("version_id", 0)) == version.pk for arm in e.arms or [])
        ]
        for experiment_id in experiments:
            experiment_stop(experiment_id=experiment_id, actor=actor, reason=why[:MAX_REASON])
        groups = group_releases_revert(version_id=version.pk, actor=actor, reason=why, origin_id=decision.pk)
        outcome: dict[str, list[str]] = {"reverted": [], "stopped": [], "nothing": [], "by_rollout": []}
        for device in Device.objects.filter(pk__in=affected).order_by("pk"):
            if device.desired_version_id is not None and device.desired_version_id != version.pk:
                # A rollout's rollback or an experiment's restore above took it back.
                outcome["by_rollout"].append(str(device.pk))
                continue
            outcome[_revert_device(device, version.pk, decision)].append(str(device.pk))
        reverted = len(outcome["reverted"]) + len(outcome["stopped"]) + len(outcome["by_rollout"])
        decision.devices_reverted = reverted
        decision.devices_without_previous = len(outcome["nothing"])
        decision.detail = {
            "devices": len(affected),
            "already_leaving": len(leaving),
            "rollback_deployments": len(outcome["reverted"]),
            "downloads_stopped": len(outcome["stopped"]),
            "by_rollouts_and_experiments": len(outcome["by_rollout"]),
            "rollouts_rolled_back": rollouts,
            "experiments_stopped": experiments,
            "groups_restored": {str(g.pk): g.release_version_id for g in groups},
            "reverted_devices": sorted(outcome["reverted"] + outcome["stopped"] + outcome["by_rollout"])[
                :MAX_LISTED
            ],
            "devices_without_previous": outcome["nothing"][:MAX_LISTED],
        }
        decision.save(update_fields=["devices_reverted", "devices_without_previous", "detail"])
        audit_record(
            actor=actor,
            action="model_version.revert",
            target=version,
            data={
                "decision": decision.pk,
                "trigger": trigger,
                "reason": reason,
                "metrics": decision.metrics,
                "devices_reverted": reverted,
                "devices_without_previous": decision.devices_without_previous,
            },
            remote_addr=remote_addr,
        )
        emit(
            "version.reverted",
            {
                "decision_id": decision.pk,
                "version_id": version.pk,
                "family_id": version.family_id,
                "trigger": trigger,
                "reason": reason,
                "devices_reverted": reverted,
                "devices_without_previous": decision.devices_without_previous,
                "metrics": decision.metrics,
            },
        )
    return decision


def _alert(*, version: Any, trigger: str, reason: str, metrics: dict[str, Any]) -> VersionDecision:
    devices = (
        Device.objects.filter(_on_version(version.pk)).exclude(status=Device.Status.DECOMMISSIONED).count()
    )
    decision = version_decision_record(
        version=version,
        action=VersionDecision.Action.ALERTED,
        trigger=trigger,
        reason=reason,
        metrics=metrics,
        detail={"devices": devices, "policy": FamilyPolicy.OnFailure.ALERT},
    )
    audit_record(
        actor=None,
        action="model_version.revert_recommended",
        target=version,
        data={"decision": decision.pk, "trigger": trigger, "reason": reason, "devices": devices},
    )
    emit(
        "version.revert_recommended",
        {
            "decision_id": decision.pk,
            "version_id": version.pk,
            "family_id": version.family_id,
            "trigger": trigger,
            "reason": reason,
            "devices": devices,
            "metrics": metrics,
        },
    )
    return decision


def version_failed(*, version_id: int, trigger: str, reason: str, metrics: dict[str, Any]) -> VersionDecision:
    """A version failed a gate or was flagged while watched: revert or alert, by its policy."""
    with transaction.atomic():
        version = _version(version_id, lock=True)
        policy = family_policy(family_id=version.family_id)
        if policy.on_failure == FamilyPolicy.OnFailure.REVERT:
            return version_revert(
                version_id=version.pk, actor=None, reason=reason, trigger=trigger, metrics=metrics
            )
        return _alert(version=version, trigger=trigger, reason=reason, metrics=metrics)


def _rollout_failed(*, rollout: Rollout, trigger: str, why: str, numbers: dict[str, Any]) -> bool:
    metrics: dict[str, Any] = {"rollout_id": rollout.pk, "wave": rollout.current_wave}
    for key in ("gates", "failed", "exposed", "succeeded", "error_threshold", "shadow", *SHADOW_NUMBERS):
        if key in numbers:
            metrics[key] = numbers[key]
    version_failed(
        version_id=rollout.version_id,
        trigger=trigger,
        reason=f"rollout {rollout.name or rollout.pk}: {why}"[:MAX_REASON],
        metrics=metrics,
    )
    status = Rollout.objects.filter(pk=rollout.pk).values_list("status", flat=True).first()
    return bool(status == Rollout.Status.ROLLED_BACK)


def rollout_gate_failed(*, rollout: Rollout, why: str, numbers: dict[str, Any]) -> bool:
    """Called by the rollout engine when a wave failed (inside its transaction), after the
    rollout's own ``on_gate_failure``. True when the rollout was rolled back by the revert."""
    return _rollout_failed(rollout=rollout, trigger=VersionDecision.Trigger.GATE, why=why, numbers=numbers)


def rollout_shadow_failed(*, rollout: Rollout, why: str, numbers: dict[str, Any]) -> None:
    """Called by the rollout engine when a rollout's shadow phase failed: no device served the
    candidate through this rollout, but other ways (an experiment, a hand assignment, a
    release) may have put it on some; the family's policy decides, as for a failed gate."""
    _rollout_failed(rollout=rollout, trigger=VersionDecision.Trigger.SHADOW, why=why, numbers=numbers)


def model_flagged_received(event: Event) -> None:
    """``model.flagged``: a flag on a watched version is handled by its family's policy.

    A version is watched for its family's ``watch_s`` after a rollout of it succeeded; a
    flag outside the watch changes nothing here (the flag and its event stand), nor does an
    ``input_drift`` flag.
    """
    if event.payload.get("reason") == "input_drift":
        return  # inputs that moved do not show the version worse (fleet.services.drift)
    version_id = int(event.payload["version_id"])
    now = timezone.now()
    version = _version(version_id)
    policy = family_policy(family_id=version.family_id)
    rollout = watching_rollout(version_id=version_id, watch_s=policy.watch_s, now=now)
    if rollout is None:
        return
    flag = {k: v for k, v in event.payload.items() if k != "version_id"}
    metrics = {**flag, "watched_by_rollout": rollout.pk, "watch_s": policy.watch_s}
    reason = (
        f"flagged {flag.get('reason', '')} ({flag.get('metric')} {flag.get('value')} against "
        f"{flag.get('reference')}) within the watch after rollout {rollout.name or rollout.pk} succeeded"
    )
    version_failed(
        version_id=version_id, trigger=VersionDecision.Trigger.FLAG, reason=reason, metrics=metrics
    )


POLICY_FIELDS = ("on_failure", "watch_s", "drift_job", "drift_job_interval_s", "auto_ship")


def family_policy_set(
    *, family_id: int, actor: Any, data: dict[str, Any], remote_addr: str | None = None
) -> FamilyPolicy:
    """Create or change a family's policy (only the fields given change)."""
    from models_registry.models import ModelFamily

    unknown = set(data) - set(POLICY_FIELDS)
    if unknown:
        raise ServiceError(f"unknown fields {sorted(unknown)}", code="validation_error")
    if "on_failure" in data and data["on_failure"] not in FamilyPolicy.OnFailure.values:
        raise ServiceError("on_failure must be alert or revert.", code="validation_error")
    with transaction.atomic():
        if not ModelFamily.objects.filter(pk=family_id).exists():
            raise NotFoundError("No such model family.", code="not_found")
        policy, _ = FamilyPolicy.objects.select_for_update().get_or_create(family_id=family_id)
        for key, value in data.items():
            setattr(policy, key, value)
        policy.updated_by = actor_label(actor)
        policy.save()
        audit_record(
            actor=actor,
            action="model_family.policy_set",
            target=policy,
            data={k: getattr(policy, k) for k in POLICY_FIELDS},
            remote_addr=remote_addr,
        )
    return policy


def drift_group_create(*, version: Any, device_ids: list[str], now: Any = None) -> Any:
    """An ad-hoc static group of the boards where ``version`` drifted, for a federated job
    (jobs select their devices from a group). Named ``drift-<family>-v<n>-<time>``; it has
    no policy and no release, so joining it changes nothing else for its boards."""
    from django.utils.text import slugify

    from fleet.models import DeviceGroup

    now = now or timezone.now()
    name = f"drift-{slugify(version.family.name)[:40]}-v{version.number}-{now:%Y%m%d%H%M%S}"
    suffix, candidate = 1, name
    while DeviceGroup.objects.filter(name=candidate).exists():
        suffix += 1
        candidate = f"{name}-{suffix}"
    group = DeviceGroup.objects.create(
        name=candidate,
        description=f"Boards where v{version.number} of {version.family.name} drifted (started by drift).",
    )
    group.static_devices.add(*Device.objects.filter(pk__in=device_ids))
    audit_record(
        actor=None,
        action="device_group.create",
        target=group,
        data={"devices": len(device_ids), "version": version.pk, "origin": "drift"},
    )
    return group
