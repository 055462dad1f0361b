"""Ship a federated job's result in one call: best version -> (variant) -> stage -> rollout.

`federated_job_ship` takes the job's best version by the family's evaluation (the one
`training.services.aggregation` keeps in ``job.best_version``: judged centrally on the
family's test set when it has one, otherwise federated on the boards' holdouts; the answer
says which), optionally the variant the registry recommends for the target group's most
common hardware, promotes it as the stages require, leaves out the boards that cannot run
it, and creates and starts a staged rollout with a shadow phase and a control cohort whose
origin records the job and the round. One transaction: a refusal anywhere changes nothing.

The rollout starts in shadow (``fleet.rollouts.shadow_gate``; ``shadow: false`` skips it):
the candidate runs beside the active version on the boards' live inputs, and the first
wave opens only once it is no worse there; waves are then judged against the control
cohort, and the last one passing makes the version the group's release.

Stages: a canary group takes staging versions, so a draft is promoted to staging by the
operator who ships. Any other group needs production, and promotion to production is for
admins: an operator shipping there is refused (403 ``production_promotion_required``);
an admin's call, or the system's (``job_auto_ship``), promotes the version itself.

``job_auto_ship`` ships a job that a drift flag started (``training.services.drift_jobs``)
when it succeeds and its family's policy has ``auto_ship``: to the group whose release is
the flagged version, else the group running it most, with the defaults above. Either way
the outcome is a ``VersionDecision`` (``auto_shipped`` with the plan, or
``auto_ship_skipped`` with the refusal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import transaction

from core.api import ConflictError, NotFoundError, ServiceError
from core.audit.services import audit_record
from core.events import emit
from core.roles import ADMIN, has_role
from fleet.models import Rollout, VersionDecision
from fleet.services.rollouts import rollout_create, rollout_start
from fleet.services.shipping import (
    group_boards_check,
    group_resolve,
    profile_latency,
    rollout_record_shipped,
)
from models_registry import selectors as registry
from models_registry.models import ModelVersion
from models_registry.services import version_promote
from training.models import FederatedJob, FederatedRound
from training.services.jobs import group_running_most

Stage = ModelVersion.Stage
VARIANTS = ("as_trained", "recommended")
# 10 % / 50 % / 100 %, each but the last soaked for SHIP_SOAK_S (600 s by default).
DEFAULT_PERCENTS = (10, 50, 100)
# A first wave smaller than this many devices could never be judged against control.
DEFAULT_MIN_FIRST_WAVE = 5
DEFAULT_CONTROL_PERCENT = 20.0
# Rollout fields a ship call may set; the rest keep the rollout defaults.
POLICY_FIELDS = (
    "name",
    "waves",
    "gates",
    "control_gates",
    "on_gate_failure",
    "success_threshold",
    "error_threshold_share",
    "error_threshold_count",
    "max_concurrent_downloads",
    "max_retries",
    "retry_backoff_s",
    "in_progress_timeout_s",
    "respect_maintenance_windows",
)
# The decisions that settle whether a drift-started job is shipped (one per job).
AUTO_SHIP_DECISIONS = (VersionDecision.Action.AUTO_SHIPPED, VersionDecision.Action.AUTO_SHIP_SKIPPED)
SHIP_FIELDS = (
    "target_group",
    "variant",
    "latency_budget_us",
    "max_accuracy_drop",
    "control_percent",
    "force",
    "shadow",
)


@dataclass(frozen=True)
class ShipResult:
    """What a ship call did: the plan with its numbers, and the started rollout."""

    plan: dict[str, Any]
    rollout: Rollout


def _best(job: FederatedJob) -> tuple[ModelVersion, FederatedRound | None]:
    done = FederatedRound.objects.filter(job=job, status=FederatedRound.Status.DONE, version__isnull=False)
    if not done.exists():
        raise ConflictError(
            f"Job {job.pk} has no successful round, so it has no version to ship.",
            code="no_successful_round",
            details={"job": job.pk, "status": job.status, "current_round": job.current_round},
        )
    best = (
        ModelVersion.objects.select_related("family").filter(pk=job.best_version_id).first()
        if job.best_version_id
        else None
    )
    if best is None:
        raise ConflictError(
            f"No version of job {job.pk} has been evaluated yet; the best version is chosen by "
            "the family's evaluation.",
            code="not_evaluated",
            details={"job": job.pk},
        )
    if best.pk == job.base_version_id:
        raise ConflictError(
            f"Job {job.pk}'s best version is its base, {best.label}: no round beat it by the family's "
            "evaluation, so there is nothing new to ship.",
            code="no_improvement",
            details={"job": job.pk, "version": best.pk, "best_metric": job.best_metric},
        )
    return best, FederatedRound.objects.filter(job=job, version=best).order_by("number").first()


def _variant(
    *, best: ModelVersion, data: dict[str, Any], profile: str | None
) -> tuple[ModelVersion, dict[str, Any]]:
    requested = data.get("variant") or "as_trained"
    if requested not in VARIANTS:
        raise ServiceError(
            f"variant must be one of {', '.join(VARIANTS)}.",
            code="validation_error",
            details={"variant": requested},
        )
    answer: dict[str, Any] = {
        "requested": requested,
        "chosen": best.pk,
        "label": best.label,
        "profile": profile,
    }
    if requested == "as_trained":
        return best, answer
    budget = data.get("latency_budget_us")
    try:
        budget_us = float(budget) if isinstance(budget, int | float | str) else 0.0
    except (TypeError, ValueError):
        budget_us = 0.0
    if not budget_us > 0:
        raise ServiceError(
            "variant 'recommended' needs latency_budget_us (the median single-input latency allowed).",
            code="validation_error",
            details={"latency_budget_us": budget},
        )
    family = best.family
    fleet_latency = profile_latency(
        profile=profile, version_ids=list(family.versions.values_list("pk", flat=True))
    )
    try:
        found = registry.family_recommend(
            family,
            latency_budget_us=budget_us,
            max_accuracy_drop=float(data.get("max_accuracy_drop", 0.01)),
            base_version_id=best.pk,
            fleet_latency=fleet_latency,
        )
    except ValueError as exc:
        answer["note"] = f"no recommendation ({exc}); shipping the version as trained"
        return best, answer
    row = found.get("recommended")
    answer["candidates"] = [
        {k: r.get(k) for k in ("version_id", "label", "variant", "decision", "reason", "latency_source")}
        for r in found.get("variants", [])
    ]
    if row is None:
        answer["note"] = (
            "no variant is within the latency budget and metric drop; shipping the version as trained"
        )
        return best, answer
    chosen = ModelVersion.objects.select_related("family").get(pk=row["version_id"])
    answer.update(
        {"chosen": chosen.pk, "label": chosen.label, "variant": chosen.variant, "reason": row.get("reason")}
    )
    return chosen, answer


def _promote(*, version: ModelVersion, canary: bool, group: str, actor: Any) -> list[str]:
    """Bring ``version`` to a stage the group takes; the stages it went through."""
    steps: list[str] = []
    if version.stage == Stage.PRODUCTION or (canary and version.stage == Stage.STAGING):
        return steps
    if (version.metrics or {}).get("rejected"):
        return steps  # the rollout refuses it with version_rejected
    if canary:
        version_promote(version=version, stage=Stage.STAGING, actor=actor)
        return [Stage.STAGING]
    if getattr(actor, "is_authenticated", False) and not has_role(actor, ADMIN):
        raise ServiceError(
            f"{version.label} is in {version.stage} and group {group} is not a canary group, so it "
            "needs production, and promoting to production is for admins. Ship to a canary group "
            "first, or ask an admin to promote it (or to ship).",
            code="production_promotion_required",
            status_code=403,
            details={
                "version": version.pk,
                "stage": version.stage,
                "group": group,
                "needs": Stage.PRODUCTION,
            },
        )
    if version.stage in (Stage.DRAFT, Stage.ARCHIVED):
        version_promote(version=version, stage=Stage.STAGING, actor=actor)
        steps.append(Stage.STAGING)
    version_promote(version=version, stage=Stage.PRODUCTION, actor=actor)
    return [*steps, Stage.PRODUCTION]


def _default_waves(*, boards: int, control_percent: float) -> list[dict[str, Any]]:
    """10 % / 50 % / 100 %, the first wave at least big enough for the control gates."""
    soak = float(settings.SHIP_SOAK_S)
    waves: list[dict[str, Any]] = [{"percent": p, "soak_s": soak if p < 100 else 0} for p in DEFAULT_PERCENTS]
    if control_percent <= 0:
        return waves
    treated = boards - math.ceil(round(control_percent * boards / 100.0, 9))
    first = math.ceil(round(0.1 * treated, 9))
    if first >= DEFAULT_MIN_FIRST_WAVE:
        return waves
    return [{"count": DEFAULT_MIN_FIRST_WAVE, "soak_s": soak}, *waves[1:]]


def federated_job_ship(
    *, job_id: int, actor: Any, data: dict[str, Any], remote_addr: str | None = None
) -> ShipResult:
    """Ship a job's best version to a group through a staged rollout with a control cohort.

    ``data``: ``target_group`` (id or name; default the job's group), ``shadow`` (a
    shadow policy, ``fleet.rollouts.shadow_gate``; default one with its defaults; false
    for none), ``variant``
    (``as_trained`` or ``recommended`` with ``latency_budget_us``), ``control_percent``
    (default 20; 0 for none), ``force`` (ship from a job still running), and rollout
    fields (:data:`POLICY_FIELDS`). Refusals: 404 unknown job; 409 ``job_not_finished``,
    ``no_successful_round``, ``not_evaluated``, ``no_improvement`` (the best is the base),
    ``no_compatible_devices``, a stage or overlap conflict of the rollout; 400
    ``validation_error`` (unknown group, bad values), ``control_too_small`` (with the
    minimum); 403 ``production_promotion_required``.
    Returns the plan and the numbers behind it, with the started rollout.
    """
    job = FederatedJob.objects.select_related("family", "target_group").filter(pk=job_id).first()
    if job is None:
        raise NotFoundError("No such federated job.", code="not_found")
    unfinished = (FederatedJob.Status.RUNNING, FederatedJob.Status.PAUSED)
    if job.status in unfinished and not data.get("force"):
        raise ConflictError(
            f"Job {job.pk} is still {job.status}; its best version may still change. Wait for it to "
            "finish, or pass force to ship the best version so far.",
            code="job_not_finished",
            details={"job": job.pk, "status": job.status, "current_round": job.current_round},
        )
    best, rnd = _best(job)
    group = (
        group_resolve(value=data["target_group"])
        if data.get("target_group") is not None
        else job.target_group
    )
    unknown = sorted(set(data) - {*POLICY_FIELDS, *SHIP_FIELDS})
    if unknown:
        raise ServiceError(
            f"Unknown field(s): {', '.join(unknown)}.", code="validation_error", details={"unknown": unknown}
        )
    evaluation = {
        "kind": (rnd.evaluation if rnd is not None else "") or (best.metrics or {}).get("evaluation", ""),
        "metric": job.family.spec.primary_metric,
        "value": job.best_metric,
        "base_version": job.base_version_id,
        "base_value": (job.base_version.metrics or {}).get(job.family.spec.primary_metric),
    }
    with transaction.atomic():
        boards = group_boards_check(group=group, version=best)
        version, variant = _variant(best=best, data=data, profile=boards.get("profile"))
        if version.pk != best.pk:
            boards = group_boards_check(group=group, version=version)
        promoted = _promote(version=version, canary=group.canary, group=group.name, actor=actor)
        version.refresh_from_db()
        control_percent = data.get("control_percent", DEFAULT_CONTROL_PERCENT)
        origin = {
            "federated_job": job.pk,
            "round": rnd.number if rnd is not None else None,
            "round_id": rnd.pk if rnd is not None else None,
            "shipped": True,
        }
        rollout_data: dict[str, Any] = {
            "version": version.pk,
            "target_group": group.pk,
            "waves": _default_waves(boards=boards["can_run"], control_percent=float(control_percent or 0)),
            "on_gate_failure": "rollback",
            "name": f"{version.label} from job {job.pk}",
            **{k: data[k] for k in POLICY_FIELDS if data.get(k) is not None},
            "held_back": boards["held_back"],
            "origin": origin,
            # Absent: a shadow phase with the default policy; false: none.
            "shadow": data.get("shadow", True),
        }
        if control_percent:
            rollout_data["control_percent"] = control_percent
        rollout = rollout_create(actor=actor, data=rollout_data, remote_addr=remote_addr)
        rollout = rollout_start(rollout_id=rollout.pk, actor=actor, remote_addr=remote_addr)
        control = rollout.decisions.filter(action="created").values_list("metrics", flat=True).first() or {}
        plan: dict[str, Any] = {
            "job": job.pk,
            "job_status": job.status,
            "forced": bool(data.get("force")) and job.status != FederatedJob.Status.SUCCEEDED,
            "round": origin["round"],
            "evaluation": evaluation,
            "version": {
                "id": version.pk,
                "label": version.label,
                "stage": version.stage,
                "promoted": promoted,
            },
            "variant": variant,
            "target_group": {"id": group.pk, "name": group.name, "canary": group.canary},
            "boards": {k: v for k, v in boards.items() if k != "held_back"},
            "held_back": [{"device": d, "reason": r} for d, r in list(boards["held_back"].items())[:100]],
            "control": {
                "percent": rollout.control_percent,
                "devices": control.get("control_devices", 0),
                "treated_devices": control.get("treated_devices", boards["can_run"]),
                "minimum": control.get("minimum", 0),
                "gates": rollout.control_gates,
            },
            "steps": [
                {
                    "step": "shadow",
                    "status": "running" if rollout.shadow_id else "skipped",
                    "shadow": rollout.shadow_id,
                    "policy": rollout.shadow_policy,
                },
                {
                    "step": "staged_rollout",
                    "status": "after the shadow passes" if rollout.shadow_id else rollout.status,
                    "rollout": rollout.pk,
                },
                {"step": "promotion", "status": "when the last wave passes, with the control cohort"},
            ],
        }
        reason = (
            f"shipped from job {job.pk} round {origin['round']}: {version.label} "
            f"({evaluation['metric']} {evaluation['value']} by {evaluation['kind'] or 'no'} evaluation) "
            f"to {boards['can_run']} of {boards['boards']} boards of {group.name}"
        )
        rollout_record_shipped(rollout=rollout, reason=reason, metrics=plan, actor=actor)
        audit_record(actor=actor, action="federated_job.ship", target=job, data=plan, remote_addr=remote_addr)
        emit(
            "federated_job.shipped",
            {
                "job": job.pk,
                "round": origin["round"],
                "version_id": version.pk,
                "rollout_id": rollout.pk,
                "target_group": group.name,
                "variant": variant["requested"],
                "held_back": boards["held_back_count"],
                "control_devices": plan["control"]["devices"],
            },
        )
    return ShipResult(plan=plan, rollout=rollout)


def job_auto_ship(*, job_id: int) -> Any:
    """Ship a succeeded job that a drift flag started, when its family's policy says so.

    Returns the ``VersionDecision`` recorded (``auto_shipped`` or ``auto_ship_skipped``), or
    None when there is nothing to decide: the job was not started by drift, did not
    succeed, was already decided on, or the policy has no ``auto_ship``.
    """
    from fleet.models import DeviceGroup
    from fleet.selectors.revert import family_policy
    from fleet.services.revert import version_decision_record

    job = FederatedJob.objects.select_related("family", "base_version").filter(pk=job_id).first()
    if job is None or job.status != FederatedJob.Status.SUCCEEDED or job.base_version is None:
        return None
    started = VersionDecision.objects.filter(
        job_id=job.pk, action=VersionDecision.Action.DRIFT_JOB_STARTED
    ).first()
    if started is None or not family_policy(family_id=job.family_id).auto_ship:
        return None
    if VersionDecision.objects.filter(job_id=job.pk, action__in=AUTO_SHIP_DECISIONS).exists():
        return None  # one decision per job, whatever delivers the event twice
    base = job.base_version
    group = DeviceGroup.objects.filter(release_version=base).order_by("pk").first()
    if group is None:
        group, _ = group_running_most(base)
    try:
        if group is None:
            raise ServiceError(
                f"No group runs {base.label} any more, so there is nowhere to ship to.", code="empty_target"
            )
        with transaction.atomic():
            shipped = federated_job_ship(job_id=job.pk, actor=None, data={"target_group": group.pk})
            return version_decision_record(
                version=shipped.rollout.version,
                action=VersionDecision.Action.AUTO_SHIPPED,
                trigger=VersionDecision.Trigger.JOB,
                reason=(
                    f"job {job.pk}, started by drift on {base.label}, succeeded: shipped to {group.name} "
                    f"(rollout {shipped.rollout.pk})"
                ),
                metrics={"evaluation": shipped.plan["evaluation"], "control": shipped.plan["control"]},
                detail={"plan": shipped.plan, "drift_decision": started.pk, "rollout": shipped.rollout.pk},
                job_id=job.pk,
            )
    except ServiceError as exc:
        with transaction.atomic():
            decision = version_decision_record(
                version=base,
                action=VersionDecision.Action.AUTO_SHIP_SKIPPED,
                trigger=VersionDecision.Trigger.JOB,
                reason=f"job {job.pk} was not shipped: {exc}"[:500],
                metrics={},
                detail={"code": exc.code, "details": exc.details, "drift_decision": started.pk},
                job_id=job.pk,
            )
            audit_record(
                actor=None,
                action="federated_job.auto_ship_skipped",
                target=job,
                data={"decision": decision.pk, "code": exc.code},
            )
            emit(
                "federated_job.auto_ship_skipped",
                {"decision_id": decision.pk, "job": job.pk, "version_id": base.pk, "code": exc.code},
            )
        return decision


def auto_ship_redrive(*, now: Any, grace: Any) -> list[int]:
    """Drift-started jobs that succeeded more than ``grace`` ago with no shipping decision
    (their event was lost with a worker): decided now. The ids of the jobs decided."""
    started = VersionDecision.objects.filter(
        action=VersionDecision.Action.DRIFT_JOB_STARTED, job_id__isnull=False
    ).values("job_id")
    decided = VersionDecision.objects.filter(action__in=AUTO_SHIP_DECISIONS, job_id__isnull=False).values(
        "job_id"
    )
    due = (
        FederatedJob.objects.filter(
            pk__in=started, status=FederatedJob.Status.SUCCEEDED, finished_at__lte=now - grace
        )
        .exclude(pk__in=decided)
        .order_by("pk")
        .values_list("pk", flat=True)[:50]
    )
    return [job_id for job_id in due if job_auto_ship(job_id=job_id) is not None]
