"""Page data for rollouts, experiments and provisioning."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, Q
from django.urls import reverse

from fleet.models import (
    Experiment,
    ExperimentDecision,
    ProvisioningJob,
    Rollout,
    RolloutDecision,
    RolloutDevice,
)
from fleet.selectors.experiments import experiment_arm_counts, experiment_decisions, experiment_list
from fleet.selectors.rollouts import rollout_decisions, rollout_list


def active_rollouts(*, limit: int = 8) -> list[Rollout]:
    return list(rollout_list().filter(status__in=Rollout.ACTIVE_STATUSES).order_by("-id")[:limit])


def active_experiments(*, limit: int = 8) -> list[Experiment]:
    return list(experiment_list().filter(status=Experiment.Status.RUNNING).order_by("-id")[:limit])


def recent_decisions(*, limit: int = 10) -> list[dict[str, Any]]:
    """The latest automatic or operator decisions of rollouts and experiments (two queries)."""
    rollout_rows = RolloutDecision.objects.select_related("rollout").order_by("-created_at", "-id")[:limit]
    experiment_rows = ExperimentDecision.objects.select_related("experiment").order_by("-created_at", "-id")[
        :limit
    ]
    items: list[dict[str, Any]] = []
    for d in rollout_rows:
        items.append(
            {
                "subject": d.rollout.name or f"rollout {d.rollout_id}",
                "url": reverse("frontend:rollout", args=[d.rollout_id]),
                "kind": d.action,
                "reason": d.reason,
                "created_at": d.created_at,
            }
        )
    for e in experiment_rows:
        items.append(
            {
                "subject": e.experiment.name,
                "url": reverse("frontend:experiment", args=[e.experiment_id]),
                "kind": e.action,
                "reason": e.reason,
                "created_at": e.created_at,
            }
        )
    items.sort(key=lambda item: item["created_at"], reverse=True)
    return items[:limit]


def rollouts(*, limit: int = 100) -> list[Rollout]:
    """Rollouts with member counts by state annotated (one query)."""
    return list(
        rollout_list()
        .annotate(
            members_total=Count("members"),
            members_active=Count("members", filter=Q(members__state="succeeded")),
            members_failed=Count("members", filter=Q(members__state__in=["failed", "rolled_back"])),
        )
        .order_by("-id")[:limit]
    )


def rollout_waves(*, rollout: Rollout) -> list[dict[str, Any]]:
    """Each wave with its planned share and its members by state (one query)."""
    rows = (
        RolloutDevice.objects.filter(rollout=rollout)
        .values("wave", "state")
        .annotate(n=Count("id"))
        .order_by("wave")
    )
    per_wave: dict[int, dict[str, int]] = {}
    for row in rows:
        per_wave.setdefault(row["wave"], {})[row["state"]] = row["n"]
    waves = []
    for index, wave in enumerate(rollout.waves or []):
        states = per_wave.get(index, {})
        total = sum(states.values())
        done = states.get("succeeded", 0)
        if index < rollout.current_wave:
            phase = "done"
        elif index == rollout.current_wave:
            phase = "current"
        else:
            phase = "waiting"
        waves.append(
            {
                "index": index,
                "number": index + 1,
                "plan": wave,
                "states": states,
                "total": total,
                "active": done,
                "failed": states.get("failed", 0) + states.get("rolled_back", 0),
                "progress": (done / total) if total else 0.0,
                "phase": phase,
            }
        )
    return waves


def _control_rows(*, rollout: Rollout, decisions: list[Any]) -> list[dict[str, Any]]:
    """Each control gate with its latest verdict (both sides' numbers), for the rollout page."""
    latest: dict[str, Any] = next(
        (d.metrics["control"] for d in reversed(decisions) if (d.metrics or {}).get("control")), {}
    )
    results = {r.get("metric"): r for r in latest.get("gates", [])}
    return [{"gate": g, "result": results.get(g["metric"])} for g in rollout.control_gates or []]


def _shadow_phase(*, rollout: Rollout, decisions: list[Any]) -> dict[str, Any] | None:
    """The shadow phase's policy and verdict: live while it runs, else the decision taken."""
    from django.utils import timezone

    from fleet.models import Shadow
    from fleet.selectors.shadows import shadow_phase_verdict

    if not rollout.shadow_policy:
        return None
    shadow = Shadow.objects.filter(pk=rollout.shadow_id).first() if rollout.shadow_id else None
    taken = next(
        (d for d in reversed(decisions) if d.action.startswith("shadow_") and d.action != "shadow_started"),
        None,
    )
    if taken is not None:
        outcome, reason, numbers = taken.action.removeprefix("shadow_"), taken.reason, taken.metrics
    elif shadow is not None and rollout.status == Rollout.Status.SHADOW:
        verdict = shadow_phase_verdict(rollout=rollout, shadow=shadow, now=timezone.now())
        outcome, reason, numbers = verdict.outcome, verdict.reason, verdict.numbers
    else:
        outcome, reason, numbers = "", "", {}
    return {
        "policy": rollout.shadow_policy,
        "shadow": shadow,
        "outcome": outcome,
        "reason": reason,
        "numbers": numbers,
    }


def rollout_page(*, rollout: Rollout) -> dict[str, Any]:
    decisions = list(rollout_decisions(rollout=rollout))
    latest_gates: dict[str, Any] = next((d.metrics for d in reversed(decisions) if d.metrics), {})
    return {
        "waves": rollout_waves(rollout=rollout),
        "decisions": decisions[::-1],
        "latest_gates": latest_gates,
        "control_rows": _control_rows(rollout=rollout, decisions=decisions),
        "shadow_phase": _shadow_phase(rollout=rollout, decisions=decisions),
        "members": list(
            RolloutDevice.objects.filter(rollout=rollout)
            .exclude(state__in=["queued"])
            .select_related("device")
            .order_by("-id")[:25]
        ),
    }


def experiments(*, limit: int = 100) -> list[Experiment]:
    return list(experiment_list().order_by("-id")[:limit])


def experiment_page(*, experiment: Experiment) -> dict[str, Any]:
    """Arms with devices and samples, each arm's comparison with control, the winner, decisions.

    `experiment.result` is what fleet's experiment evaluation stores: `arms` (n, mean),
    `comparisons` (diff with its always-valid confidence interval, p-values) and `winner`.
    """
    arms = experiment_arm_counts(experiment=experiment)
    result = experiment.result or {}
    summaries = {a.get("arm"): a for a in result.get("arms") or [] if isinstance(a, dict)}
    comparisons = {c.get("arm"): c for c in result.get("comparisons") or [] if isinstance(c, dict)}
    for arm in arms:
        arm["summary"] = summaries.get(arm["arm"], {})
        arm["comparison"] = comparisons.get(arm["arm"])
    return {
        "arms": arms,
        "result": result,
        "winner": result.get("winner"),
        "stopped_reason": result.get("stopped_reason"),
        "decisions": list(experiment_decisions(experiment=experiment))[::-1],
    }


def provisioning_jobs(*, limit: int = 100) -> list[ProvisioningJob]:
    return list(
        ProvisioningJob.objects.select_related("group", "device", "created_by").order_by(
            "-created_at", "-id"
        )[:limit]
    )
