"""A/B experiments: assign a group's devices to arms, watch guardrails, name a winner.

Assignment: `sha256(f"exp{id}:{device_id}")` mapped to [0, 1) and to arms by cumulative
share, so a device keeps its arm for the life of the experiment, arms get their share of
the group, and late joiners are assigned the same way on the next evaluation.

Evaluation (`experiment_evaluate`, run by `fleet.experiments_evaluate`). Devices are what
is randomised, so devices are the unit of analysis: each device's samples of a metric are
reduced to its own figure (its mean, or for a latency guardrail its p95), and each device
counts once, however much it reports.

1. guardrails (absolute gate limits, e.g. `{"metric": "error_rate", "max": 0.05}`) are
   checked on every arm on the median over its devices, once `min_devices` of them have
   `min_samples` samples (as rollout gates); a breach stops the experiment and sends
   every device back to the version it ran before;
2. the primary metric (`accuracy`: mean of `correct`, for classification families;
   `mae`: mean of `abs_error`, for regression families, lower is better; `latency`: mean
   of `latency_ms`, lower is better) is taken per device; a device counts once it has
   `min_samples_per_device` samples. Once both arms have `min_devices_per_arm` such
   devices, each arm is compared with arm 0 (control) by the always-valid mSPRT on the
   per-device means (`fleet.rollouts.stats.look_at_device_means`), whose p-value may be
   checked on every tick without inflating false positives; with several treatment arms
   alpha is split between them (Bonferroni). Welch's t-test on the same per-device means
   (fixed horizon) is reported next to it for reference;
3. once every compared arm also has `min_samples_per_arm` samples among its counted
   devices and the always-valid p-value is below alpha, the better arm wins: status
   `completed`, `result` holds the winner, the effect (difference of the mean device
   figures with control), its always-valid confidence interval, the p-value and e-value.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
from django.db import transaction
from django.utils import timezone

from core.api import ConflictError, ServiceError
from core.audit.services import actor_label, audit_record
from core.events import emit
from fleet.models import Device, DeviceGroup, Experiment, ExperimentAssignment, ExperimentDecision, Rollout
from fleet.rollouts.gates import DeviceSummary, evaluate_gate, percentile_metrics_for, validate_gates
from fleet.rollouts.stats import look_at_device_means
from fleet.rollouts.waves import assign_arm
from fleet.selectors.devices import group_members
from fleet.selectors.experiments import experiment_arm_stats
from fleet.selectors.rollouts import devices_in_active_rollouts
from fleet.services.deployments import deployment_open
from fleet.services.rollouts import check_gates_fit, rollout_create, rollout_start
from fleet.services.stages import check_deployable
from fleet.services.transitions import Step, transition

logger = logging.getLogger(__name__)

ORIGIN = "experiment"
# Per primary metric: the raw samples compared, whether lower is better, the name people read.
PRIMARY_SAMPLES: dict[str, str] = {
    Experiment.PrimaryMetric.ACCURACY: "correct",
    Experiment.PrimaryMetric.MAE: "abs_error",
    Experiment.PrimaryMetric.LATENCY: "latency_ms",
}
LOWER_IS_BETTER: frozenset[str] = frozenset({Experiment.PrimaryMetric.MAE, Experiment.PrimaryMetric.LATENCY})
PRIMARY_LABELS: dict[str, str] = {
    Experiment.PrimaryMetric.ACCURACY: "accuracy",
    Experiment.PrimaryMetric.MAE: "mean absolute error",
    Experiment.PrimaryMetric.LATENCY: "mean latency (ms)",
}
# The primary metrics that read a task's feedback fit only that task; latency fits any.
PRIMARY_TASKS: dict[str, str] = {
    Experiment.PrimaryMetric.ACCURACY: "classification",
    Experiment.PrimaryMetric.MAE: "regression",
}


def primary_metrics_for_task(task: str) -> list[str]:
    """The primary metrics an experiment on versions of a ``task`` family may compare."""
    return [m for m in Experiment.PrimaryMetric.values if PRIMARY_TASKS.get(m, task) == task]


def _decide(
    experiment: Experiment,
    *,
    action: str,
    reason: str = "",
    metrics: dict[str, Any] | None = None,
    actor: Any = None,
) -> None:
    ExperimentDecision.objects.create(
        experiment=experiment, action=action, reason=reason, metrics=metrics or {}, actor=actor_label(actor)
    )


def _event(experiment: Experiment, event_type: str, **extra: Any) -> None:
    emit(
        event_type,
        {
            "experiment_id": experiment.pk,
            "name": experiment.name,
            "status": experiment.status,
            "winner_arm": experiment.winner_arm,
            **extra,
        },
    )


def _check_arm_stage(*, version: Any, group: DeviceGroup, index: int) -> None:
    target = f"canary group {group.name}" if group.canary else f"group {group.name} (not a canary group)"
    check_deployable(version=version, canary=group.canary, target=target, what=f"arm {index}: ")


def experiment_create(*, actor: Any, data: dict[str, Any], remote_addr: str | None = None) -> Experiment:
    """Validate and save a draft experiment.

    `data`: `name`, `target_group` (id), `arms` (`[{"name", "version_id", "share"}]`, 2+,
    shares summing to 1, arm 0 is the control; every arm a version of one family),
    `primary_metric` (accuracy for classification, mae for regression, or latency; by
    default the family's primary metric), `guardrails`, `min_samples_per_arm`,
    `min_samples_per_device`, `min_devices_per_arm`, `alpha`, `effect_scale`. Refused
    with 400 `mixed_families` (arms of different families), `metric_not_for_task` (a
    primary metric of the other task), `gate_not_for_task` (a
    guardrail of the other task), `unknown_metric`, `no_compatible_artifact`,
    `empty_target` or `validation_error`, and with 409 `version_stage_not_allowed` or
    `version_rejected` for an arm whose version the group may not take (production
    only, staging too on a canary group: `fleet.services.stages`).
    """
    from models_registry.models import Artifact, ModelVersion

    group = DeviceGroup.objects.filter(pk=data.get("target_group") or 0).first()
    if group is None:
        raise ServiceError(
            "Unknown device group.",
            code="validation_error",
            details={"target_group": data.get("target_group")},
        )
    arms = data.get("arms") or []
    if not isinstance(arms, list) or len(arms) < 2:
        raise ServiceError("An experiment needs at least two arms.", code="validation_error")
    clean_arms: list[dict[str, Any]] = []
    families: dict[int, Any] = {}
    for i, arm in enumerate(arms):
        try:
            version_id, share = int(arm["version_id"]), float(arm["share"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ServiceError(f"arm {i} needs version_id and share.", code="validation_error") from exc
        version = ModelVersion.objects.select_related("family").filter(pk=version_id).first()
        if version is None:
            raise ServiceError(f"arm {i}: unknown version {version_id}.", code="validation_error")
        families.setdefault(version.family_id, version.family)
        _check_arm_stage(version=version, group=group, index=i)
        if not Artifact.objects.filter(version=version, kind=Artifact.Kind.ONNX).exists():
            raise ServiceError(
                f"{version.label} has no ONNX artifact.",
                code="no_compatible_artifact",
                details={"version": version_id},
            )
        if share <= 0:
            raise ServiceError(f"arm {i}: share must be > 0.", code="validation_error")
        clean_arms.append(
            {"name": str(arm.get("name") or f"arm{i}"), "version_id": version_id, "share": share}
        )
    if abs(sum(a["share"] for a in clean_arms) - 1.0) > 1e-6:
        raise ServiceError("Arm shares must sum to 1.", code="validation_error")
    if len(families) > 1:
        names = sorted(f.name for f in families.values())
        raise ServiceError(
            f"Every arm must be a version of one family; these are of {', '.join(names)}.",
            code="mixed_families",
            details={"families": names},
        )
    family = next(iter(families.values()))
    task = str(family.task)
    try:
        guardrails = validate_gates(gates=data.get("guardrails") or [])
    except KeyError as exc:
        raise ServiceError(
            f"Unknown guardrail metric {exc.args[0]!r}.",
            code="unknown_metric",
            details={"metric": exc.args[0]},
        ) from exc
    except ValueError as exc:
        raise ServiceError(str(exc), code="validation_error") from exc
    check_gates_fit(gates=guardrails, task=task, what="guardrail")
    if any(
        g.get("max_increase_pct") is not None or g.get("max_decrease_pct") is not None for g in guardrails
    ):
        raise ServiceError("Guardrails take absolute limits (max, min).", code="validation_error")
    primary = data.get("primary_metric") or ("mae" if task == "regression" else "accuracy")
    fits = primary_metrics_for_task(task)
    if primary not in Experiment.PrimaryMetric.values:
        raise ServiceError(
            f"primary_metric must be one of {', '.join(Experiment.PrimaryMetric.values)}.",
            code="unknown_metric",
            details={"metric": primary, "known": list(Experiment.PrimaryMetric.values)},
        )
    if primary not in fits:
        raise ServiceError(
            f"The primary metric {primary!r} does not fit {family.name}, a {task} family; "
            f"primary metrics for {task}: {', '.join(fits)}.",
            code="metric_not_for_task",
            details={"task": task, "metric": primary, "fits": fits},
        )
    members = [
        str(pk)
        for pk in group_members(group=group)
        .exclude(status=Device.Status.DECOMMISSIONED)
        .values_list("pk", flat=True)
    ]
    if not members:
        raise ServiceError("The target group has no devices.", code="empty_target")
    alpha = float(data.get("alpha", 0.05))
    if not 0 < alpha < 0.5:
        raise ServiceError("alpha must be in (0, 0.5).", code="validation_error")
    min_samples_per_device = int(data.get("min_samples_per_device", 20))
    min_devices_per_arm = int(data.get("min_devices_per_arm", 5))
    if min_samples_per_device < 1:
        raise ServiceError("min_samples_per_device must be >= 1.", code="validation_error")
    if min_devices_per_arm < 2:
        # A per-device comparison needs a spread on each side.
        raise ServiceError("min_devices_per_arm must be >= 2.", code="validation_error")
    with transaction.atomic():
        experiment = Experiment.objects.create(
            name=str(data.get("name") or f"experiment on {group.name}"),
            target_group=group,
            arms=clean_arms,
            primary_metric=primary,
            guardrails=guardrails,
            min_samples_per_arm=int(data.get("min_samples_per_arm", 200)),
            min_samples_per_device=min_samples_per_device,
            min_devices_per_arm=min_devices_per_arm,
            alpha=alpha,
            effect_scale=float(data.get("effect_scale", 0.05)),
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        _decide(experiment, action="created", metrics={"target_devices": len(members)}, actor=actor)
        audit_record(
            actor=actor, action="experiment.create", target=experiment, data={**data}, remote_addr=remote_addr
        )
    return experiment


def _assign_new(experiment: Experiment) -> int:
    """Assign devices of the group that have no arm yet; tell them their arm's version."""
    assigned = set(
        str(d)
        for d in ExperimentAssignment.objects.filter(experiment=experiment).values_list(
            "device_id", flat=True
        )
    )
    held = devices_in_active_rollouts()
    shares = [float(a["share"]) for a in experiment.arms]
    added = 0
    for device in group_members(group=experiment.target_group).exclude(status=Device.Status.DECOMMISSIONED):
        key = str(device.pk)
        if key in assigned or key in held:
            continue
        arm = assign_arm(experiment_id=experiment.pk, device_id=key, shares=shares)
        version_id = int(experiment.arms[arm]["version_id"])
        ExperimentAssignment.objects.create(
            experiment=experiment,
            device=device,
            arm=arm,
            version_id=version_id,
            previous_version_id=device.running_version_id,
        )
        if device.desired_version_id != version_id or device.running_version_id != version_id:
            Device.objects.filter(pk=device.pk).update(desired_version_id=version_id)
            device.desired_version_id = version_id
            if device.running_version_id != version_id:
                deployment_open(
                    device=device, version_id=version_id, origin_type=ORIGIN, origin_id=experiment.pk
                )
        added += 1
    return added


def _restore(experiment: Experiment) -> int:
    """Send every assigned device back to the version it ran before the experiment."""
    restored = 0
    for assignment in ExperimentAssignment.objects.filter(experiment=experiment).select_related("device"):
        previous = assignment.previous_version_id
        device = assignment.device
        if previous is None or previous == assignment.version_id:
            continue
        Device.objects.filter(pk=device.pk).update(desired_version_id=previous)
        device.desired_version_id = previous
        if device.running_version_id != previous:
            deployment_open(
                device=device,
                version_id=previous,
                origin_type=ORIGIN,
                origin_id=experiment.pk,
                rollback=True,
            )
        restored += 1
    return restored


def experiment_start(*, experiment_id: int, actor: Any, remote_addr: str | None = None) -> Experiment:
    """Assign the group's devices to arms and ship each arm's version."""

    def step(experiment: Experiment) -> Step:
        from models_registry.models import ModelVersion

        # Checked again: a version may have been archived since the draft was saved.
        group = experiment.target_group
        versions = ModelVersion.objects.select_related("family").in_bulk(
            [int(arm["version_id"]) for arm in experiment.arms]
        )
        for index, arm in enumerate(experiment.arms):
            _check_arm_stage(version=versions[int(arm["version_id"])], group=group, index=index)
        members = [
            str(pk) for pk in group_members(group=experiment.target_group).values_list("pk", flat=True)
        ]
        held = devices_in_active_rollouts()
        clash = [d for d in members if d in held]
        if clash:
            raise ConflictError(
                f"Devices of the group are in running or paused rollout {held[clash[0]]}.",
                code="overlapping_rollout",
                details={"rollout_id": held[clash[0]], "devices": clash[:20]},
            )
        experiment.status = Experiment.Status.RUNNING
        experiment.started_at = timezone.now()
        added = _assign_new(experiment)
        return Step(
            decision="started",
            event="experiment.started",
            fields=["status", "started_at"],
            metrics={"assigned": added},
        )

    return _transition(
        experiment_id=experiment_id,
        actor=actor,
        remote_addr=remote_addr,
        allowed=(Experiment.Status.DRAFT,),
        audit_action="experiment.start",
        step=step,
    )


def experiment_stop(
    *, experiment_id: int, actor: Any, reason: str = "", remote_addr: str | None = None
) -> Experiment:
    """Stop a running experiment and send its devices back to their previous versions."""

    def step(experiment: Experiment) -> Step:
        restored = _restore(experiment)
        experiment.status = Experiment.Status.STOPPED
        experiment.finished_at = timezone.now()
        experiment.result = {**experiment.result, "stopped_reason": reason or "stopped by operator"}
        return Step(
            decision="stopped",
            event="experiment.stopped",
            fields=["status", "finished_at", "result"],
            reason=reason or "stopped by operator",
            metrics={"restored": restored},
            event_extra={"reason": reason},
        )

    return _transition(
        experiment_id=experiment_id,
        actor=actor,
        remote_addr=remote_addr,
        allowed=(Experiment.Status.RUNNING,),
        audit_action="experiment.stop",
        audit_data={"reason": reason},
        step=step,
    )


def _transition(
    *,
    experiment_id: int,
    actor: Any,
    remote_addr: str | None,
    allowed: tuple[str, ...],
    audit_action: str,
    step: Callable[[Experiment], Step],
    audit_data: dict[str, Any] | None = None,
) -> Experiment:
    return transition(
        model=Experiment,
        pk=experiment_id,
        allowed=allowed,
        actor=actor,
        remote_addr=remote_addr,
        audit_action=audit_action,
        audit_data=audit_data,
        step=step,
        decide=_decide,
        announce=_event,
    )


@dataclass(frozen=True)
class _ArmMeans:
    """The primary metric of one arm, device by device."""

    means: np.ndarray  # one mean per device with enough samples
    samples: int  # the samples behind them
    short: int  # devices that reported fewer than min_samples_per_device


def _arm_means(experiment: Experiment, stats: Mapping[str, Mapping[str, DeviceSummary]]) -> _ArmMeans:
    name = PRIMARY_SAMPLES[str(experiment.primary_metric)]
    means: list[float] = []
    samples = short = 0
    for summaries in stats.values():
        found = summaries.get(name)
        if found is None or found.n == 0:
            continue
        if found.n < experiment.min_samples_per_device:
            short += 1
            continue
        means.append(found.mean)
        samples += found.n
    return _ArmMeans(np.asarray(means, dtype=np.float64), samples, short)


def experiment_evaluate(*, experiment_id: int, now: datetime | None = None) -> dict[str, Any]:
    """One evaluation of a running experiment; returns (and stores) its result."""
    now = now or timezone.now()
    with transaction.atomic():
        experiment = Experiment.objects.select_for_update(skip_locked=True).filter(pk=experiment_id).first()
        if experiment is None or experiment.status != Experiment.Status.RUNNING:
            return {"status": experiment.status if experiment else "busy"}
        joined = _assign_new(experiment)
        arm_stats = experiment_arm_stats(
            experiment=experiment, until=now, p95_of=percentile_metrics_for(experiment.guardrails)
        )

        # Guardrails first: a harmful arm stops everything, whatever the primary metric says.
        # Like rollout gates they read the median over the arm's devices.
        for index, stats in arm_stats.items():
            for guard in experiment.guardrails:
                verdict = evaluate_gate(gate=guard, candidate=stats, baseline=None)
                if verdict.outcome == "failed":
                    arm_name = experiment.arms[index]["name"]
                    why = f"guardrail breached on arm {arm_name}: {verdict.reason}"
                    restored = _restore(experiment)
                    experiment.status = Experiment.Status.STOPPED
                    experiment.finished_at = now
                    experiment.result = {"stopped_reason": why, "guardrail": verdict.as_dict(), "arm": index}
                    experiment.save(update_fields=["status", "finished_at", "result"])
                    _decide(
                        experiment,
                        action="guardrail_breach",
                        reason=why,
                        metrics={**verdict.as_dict(), "arm": index, "restored": restored},
                    )
                    _event(experiment, "experiment.stopped", reason=why)
                    return experiment.result

        result = _compare(experiment, arm_stats)
        result["late_joiners"] = joined
        result["evaluated_at"] = now.isoformat()
        winner = result.get("winner")
        experiment.result = result
        fields = ["result"]
        if winner is not None:
            experiment.status = Experiment.Status.COMPLETED
            experiment.winner_arm = int(winner["arm"])
            experiment.finished_at = now
            fields += ["status", "winner_arm", "finished_at"]
            _decide(experiment, action="winner", reason=winner["summary"], metrics=result)
            _event(experiment, "experiment.completed", winner=winner)
        experiment.save(update_fields=fields)
        return result


def _compare(
    experiment: Experiment, arm_stats: Mapping[int, Mapping[str, Mapping[str, DeviceSummary]]]
) -> dict[str, Any]:
    """Each treatment arm against control, device by device: the mSPRT on per-device means
    (running-min p) and Welch's t on the same means for reference.

    A look counts once both arms have `min_devices_per_arm` devices with
    `min_samples_per_device` samples each; a difference is significant once the
    always-valid p is below alpha and both arms have `min_samples_per_arm` samples.
    """
    previous = {c["arm"]: c for c in (experiment.result or {}).get("comparisons", [])}
    per_arm = {
        index: _arm_means(experiment, arm_stats.get(index, {})) for index in range(len(experiment.arms))
    }
    control = per_arm[0]
    lower_is_better = experiment.primary_metric in LOWER_IS_BETTER
    k = len(experiment.arms) - 1
    alpha = experiment.alpha / k
    min_devices = max(2, experiment.min_devices_per_arm)
    arms_summary = []
    for index, arm in enumerate(experiment.arms):
        found = per_arm[index]
        arms_summary.append(
            {
                "arm": index,
                "name": arm["name"],
                "version_id": arm["version_id"],
                "devices": int(found.means.size),
                "devices_short": found.short,
                "n": found.samples,
                # Each device one vote: the mean of the devices' means.
                "mean": float(found.means.mean()) if found.means.size else None,
            }
        )
    comparisons: list[dict[str, Any]] = []
    for index in range(1, len(experiment.arms)):
        treat = per_arm[index]
        entry: dict[str, Any] = {
            "arm": index,
            "unit": "device",
            "n_control": int(control.means.size),
            "n_arm": int(treat.means.size),
            "samples_control": control.samples,
            "samples_arm": treat.samples,
            "min_devices": min_devices,
        }
        if control.means.size >= min_devices and treat.means.size >= min_devices:
            if lower_is_better:
                tau = experiment.effect_scale * max(float(control.means.mean()), 1e-9)
            else:
                tau = experiment.effect_scale
            look = look_at_device_means(
                control=control.means,
                treatment=treat.means,
                tau=tau,
                alpha=alpha,
                previous_p=float(previous.get(index, {}).get("always_valid_p", 1.0)),
            )
            seq = look.sequential
            entry.update(
                {
                    "diff": seq.diff,
                    "ci_low": seq.ci_low,
                    "ci_high": seq.ci_high,
                    "e_value": seq.e_value,
                    "p_value_look": seq.p_value,
                    "always_valid_p": look.always_valid_p,
                    "alpha": alpha,
                    "fixed_test": look.fixed.as_dict(),
                    "enough_samples": bool(
                        min(control.samples, treat.samples) >= experiment.min_samples_per_arm
                    ),
                }
            )
            is_better = seq.diff < 0 if lower_is_better else seq.diff > 0
            entry["significant"] = bool(look.significant and entry["enough_samples"])
            entry["direction"] = "better" if is_better else "worse"
        else:
            entry["enough_samples"] = False
        comparisons.append(entry)
    result: dict[str, Any] = {
        "primary_metric": experiment.primary_metric,
        "unit": "device",
        "arms": arms_summary,
        "comparisons": comparisons,
    }
    significant = [c for c in comparisons if c.get("significant")]
    winner: dict[str, Any] | None = None
    better = [c for c in significant if c["direction"] == "better"]
    if better:
        best = max(better, key=lambda c: -c["diff"] if lower_is_better else c["diff"])
        winner = _winner(experiment, best["arm"], best, control_wins=False)
    elif (
        comparisons
        and len(significant) == len(comparisons)
        and all(c["direction"] == "worse" for c in significant)
    ):
        # Every treatment is significantly worse: control is the winner; report the closest.
        closest = min(significant, key=lambda c: abs(c["diff"]))
        winner = _winner(experiment, 0, closest, control_wins=True)
    if winner is not None:
        result["winner"] = winner
    return result


def _winner(
    experiment: Experiment, arm: int, comparison: dict[str, Any], *, control_wins: bool
) -> dict[str, Any]:
    name = experiment.arms[arm]["name"]
    metric = PRIMARY_LABELS[str(experiment.primary_metric)]
    other = experiment.arms[comparison["arm"]]["name"]
    confidence = 1.0 - comparison["alpha"]
    summary = (
        f"{name} wins on {metric}: difference {other} - control = {comparison['diff']:+.4g}, "
        f"{confidence:.0%} always-valid CI [{comparison['ci_low']:+.4g}, {comparison['ci_high']:+.4g}], "
        f"p = {comparison['always_valid_p']:.3g} (e-value {comparison['e_value']:.3g}), "
        f"{comparison['n_control']} / {comparison['n_arm']} devices "
        f"({comparison['samples_control']} / {comparison['samples_arm']} samples)"
    )
    return {
        "arm": arm,
        "name": name,
        "version_id": experiment.arms[arm]["version_id"],
        "effect": comparison["diff"] if not control_wins else -comparison["diff"],
        "ci": [comparison["ci_low"], comparison["ci_high"]],
        "p_value": comparison["always_valid_p"],
        "e_value": comparison["e_value"],
        "confidence": confidence,
        "summary": summary,
    }


def experiment_promote(
    *,
    experiment_id: int,
    actor: Any,
    rollout: dict[str, Any] | None = None,
    start: bool = False,
    remote_addr: str | None = None,
) -> Rollout:
    """Create a rollout of the winning arm's version to the experiment's group.

    `rollout` may carry waves, gates and the other rollout fields; by default waves of
    10%, 50%, 100% with 60 s soaks. The experiment becomes `promoted`.
    """
    created: Rollout | None = None

    def step(experiment: Experiment) -> Step:
        nonlocal created
        if experiment.winner_arm is None:
            raise ConflictError(
                "Only a completed experiment with a winner can be promoted.", code="invalid_state"
            )
        winner = experiment.arms[experiment.winner_arm]
        data = {
            "waves": [
                {"percent": 10, "soak_s": 60},
                {"percent": 50, "soak_s": 60},
                {"percent": 100, "soak_s": 0},
            ],
            **(rollout or {}),
            "version": winner["version_id"],
            "target_group": experiment.target_group_id,
            "origin": {"experiment": experiment.pk},
        }
        data.setdefault("name", f"{experiment.name}: promote {winner['name']}")
        # The experiment is finished, so its devices are free for the rollout.
        experiment.status = Experiment.Status.PROMOTED
        experiment.save(update_fields=["status"])
        created = rollout_create(actor=actor, data=data, remote_addr=remote_addr)
        experiment.promoted_rollout = created
        return Step(
            decision="promoted",
            event="experiment.promoted",
            fields=["status", "promoted_rollout"],
            metrics={"rollout_id": created.pk},
            event_extra={"rollout_id": created.pk},
            audit={"rollout": created.pk},
        )

    _transition(
        experiment_id=experiment_id,
        actor=actor,
        remote_addr=remote_addr,
        allowed=(Experiment.Status.COMPLETED,),
        audit_action="experiment.promote",
        step=step,
    )
    assert created is not None
    if start:
        rollout_start(rollout_id=created.pk, actor=actor, remote_addr=remote_addr)
        created.refresh_from_db()
    return created


def running_experiment_ids() -> list[int]:
    return list(
        Experiment.objects.filter(status=Experiment.Status.RUNNING)
        .order_by("id")
        .values_list("pk", flat=True)
    )
