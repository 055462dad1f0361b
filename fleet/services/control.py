"""A rollout's control cohort on the rows: who is held back, the control gates, the release.

The pure rules are in :mod:`fleet.rollouts.control`; this module applies them to a
rollout: `rollout_configure_control` (at create: the share, the gates, the minimum),
`wave_target_ids` (what the waves draw from: the target less control and held-back
devices), `control_judge` (the control gates over the current wave's window) and
`control_release` (when the rollout succeeds, the control devices get the version too,
as members of the last wave, so a later rollback takes them back as well).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from core.api import ServiceError
from fleet.models import Device, Rollout, RolloutDevice
from fleet.rollouts.control import (
    control_minimum,
    judge_all,
    split_control,
    validate_control_gates,
    validate_control_percent,
)
from fleet.rollouts.gates import GATE_METRICS, raw_metrics_for
from fleet.rollouts.waves import cumulative_size
from fleet.selectors.rollouts import device_metric_stats, rollout_target_ids
from fleet.services.deployments import deployment_open

ORIGIN = "rollout"


def default_control_gates(*, task: str) -> list[dict[str, Any]]:
    """The family's quality metric and the error rate, judged against control."""
    quality = "accuracy" if task == "classification" else "mae"
    return validate_control_gates(gates=[{"metric": quality}, {"metric": "error_rate"}])


def control_plan(
    *, rollout_id: int, device_ids: list[str], percent: float, gates: list[dict[str, Any]]
) -> dict[str, Any]:
    """Who is control among ``device_ids``, and whether that is enough (400 ``control_too_small``)."""
    treated, control = split_control(rollout_id=rollout_id, device_ids=device_ids, percent=percent)
    minimum = control_minimum(gates)
    numbers = {
        "control_percent": percent,
        "control_devices": len(control),
        "treated_devices": len(treated),
        "minimum": minimum,
    }
    if percent > 0 and (len(control) < minimum or len(treated) < minimum):
        side = "control cohort" if len(control) < minimum else "rest of the target"
        raise ServiceError(
            f"The {side} is too small: {percent:g}% of {len(device_ids)} devices gives "
            f"{len(control)} control and {len(treated)} treated devices; the control gates need at "
            f"least {minimum} on each side. Raise control_percent or target more devices.",
            code="control_too_small",
            details=numbers,
        )
    return {**numbers, "control": control}


def rollout_configure_control(*, rollout: Rollout, data: dict[str, Any], task: str) -> dict[str, Any]:
    """Set a new rollout's control share and gates from ``data``; called inside its create.

    Raises 400 ``validation_error`` / ``unknown_metric`` for bad values and
    ``control_too_small`` (with the minimum) when either side cannot reach the gates'
    minimum devices. Returns the numbers for the creation decision.
    """
    raw_percent = data.get("control_percent")
    if raw_percent is None and not data.get("control_gates"):
        return {}
    try:
        percent = validate_control_percent(raw_percent if raw_percent is not None else 0)
        gates = validate_control_gates(gates=data.get("control_gates"))
    except KeyError as exc:
        raise ServiceError(
            f"Unknown control gate metric {exc.args[0]!r}.",
            code="unknown_metric",
            details={"metric": exc.args[0], "known": list(GATE_METRICS)},
        ) from exc
    except ValueError as exc:
        raise ServiceError(str(exc), code="validation_error", details={"control": str(exc)}) from exc
    if percent <= 0:
        if gates:
            raise ServiceError("control_gates need a control_percent above 0.", code="validation_error")
        return {}
    gates = gates or default_control_gates(task=task)
    held = set(rollout.held_back or {})
    target = [d for d in rollout_target_ids(rollout=rollout) if d not in held]
    plan = control_plan(rollout_id=rollout.pk, device_ids=target, percent=percent, gates=gates)
    first = cumulative_size(wave=rollout.waves[0], total=plan["treated_devices"])
    if first < plan["minimum"]:
        # The control gates would wait for ever: a wave is judged on its own devices.
        raise ServiceError(
            f"The first wave exposes {first} devices; the control gates need at least "
            f"{plan['minimum']} on each side. Make it larger (a count or a higher percent).",
            code="first_wave_too_small",
            details={"first_wave_devices": first, "minimum": plan["minimum"]},
        )
    rollout.control_percent = percent
    rollout.control_gates = gates
    rollout.control_device_ids = plan["control"]
    rollout.save(update_fields=["control_percent", "control_gates", "control_device_ids"])
    return {k: v for k, v in plan.items() if k != "control"}


def control_ids(*, rollout: Rollout, target: list[str] | None = None) -> list[str]:
    """The control devices still in the rollout's target (held-back devices excluded)."""
    if rollout.control_percent <= 0 or not rollout.control_device_ids:
        return []
    current = set(target if target is not None else rollout_target_ids(rollout=rollout))
    held = set(rollout.held_back or {})
    return [d for d in rollout.control_device_ids if d in current and d not in held]


def wave_target_ids(*, rollout: Rollout, target: list[str]) -> list[str]:
    """The devices the waves draw from: the target less held-back and control devices."""
    out = set(rollout.held_back or {}) | set(rollout.control_device_ids or [])
    return [d for d in target if d not in out]


def control_judge(*, rollout: Rollout, now: datetime) -> tuple[str, dict[str, Any]]:
    """The control gates over the current wave's window: the verdict and both sides' numbers.

    Candidate: what the rollout's members reported for the new version since the wave
    started. Control: what the control devices reported for any other version over the
    same window. Each device one observation (`fleet.rollouts.control`).
    """
    if rollout.control_percent <= 0 or not rollout.control_gates:
        return "passed", {}
    start = rollout.wave_started_at or now
    until = now + timedelta(seconds=1)
    names = raw_metrics_for(rollout.control_gates)
    control = control_ids(rollout=rollout)
    candidate_stats = device_metric_stats(
        version_ids=[rollout.version_id],
        since=start,
        until=until,
        devices=RolloutDevice.objects.filter(rollout=rollout).values("device_id"),
        names=names,
        p95_of=["latency_ms"] if any(g["metric"] == "latency_p95_ms" for g in rollout.control_gates) else [],
    )
    incumbents = {
        v
        for v in Device.objects.filter(pk__in=control).values_list("running_version_id", flat=True)
        if v and v != rollout.version_id
    }
    control_stats = (
        device_metric_stats(
            version_ids=incumbents,
            since=start,
            until=until,
            devices=control,
            names=names,
            p95_of=["latency_ms"]
            if any(g["metric"] == "latency_p95_ms" for g in rollout.control_gates)
            else [],
        )
        if incumbents
        else {}
    )
    verdict, results = judge_all(
        gates=rollout.control_gates, candidate=candidate_stats, control=control_stats
    )
    return verdict, {
        "verdict": verdict,
        "window": {"since": start.isoformat(), "until": now.isoformat()},
        "control_devices": len(control),
        "incumbent_versions": sorted(incumbents),
        "gates": [r.as_dict() for r in results],
    }


def control_release(*, rollout: Rollout, now: datetime) -> int:
    """Give the control devices the version once the rollout succeeded; returns how many.

    They join as members of the last wave (in progress, their previous version kept), so
    a rollback of the succeeded rollout sends them back with the others.
    """
    control = control_ids(rollout=rollout)
    if not control:
        return 0
    known = {
        str(d) for d in RolloutDevice.objects.filter(rollout=rollout).values_list("device_id", flat=True)
    }
    released = 0
    for device in Device.objects.filter(pk__in=[d for d in control if d not in known]).exclude(
        status=Device.Status.DECOMMISSIONED
    ):
        member = RolloutDevice.objects.create(
            rollout=rollout,
            device=device,
            wave=rollout.current_wave,
            previous_version_id=device.running_version_id,
        )
        if device.running_version_id == rollout.version_id:
            RolloutDevice.objects.filter(pk=member.pk).update(
                state=RolloutDevice.State.SUCCEEDED, finished_at=now, ever_active=True
            )
            continue
        Device.objects.filter(pk=device.pk).update(desired_version_id=rollout.version_id)
        device.desired_version_id = rollout.version_id
        deployment = deployment_open(
            device=device, version_id=rollout.version_id, origin_type=ORIGIN, origin_id=rollout.pk
        )
        RolloutDevice.objects.filter(pk=member.pk).update(
            state=RolloutDevice.State.IN_PROGRESS, deployment=deployment, attempts=1, attempt_started_at=now
        )
        released += 1
    return released
