"""Reads for A/B experiments: arm membership and what each arm's devices reported."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db.models import QuerySet

from fleet.models import Experiment, ExperimentAssignment, ExperimentDecision
from fleet.rollouts.gates import DeviceSummary
from fleet.selectors.rollouts import device_metric_stats


def experiment_list() -> QuerySet[Experiment]:
    return Experiment.objects.select_related("target_group")


def experiment_arm_devices(*, experiment: Experiment) -> dict[int, list[str]]:
    """Arm index -> device ids assigned to it."""
    arms: dict[int, list[str]] = {i: [] for i in range(len(experiment.arms))}
    for arm, device_id in ExperimentAssignment.objects.filter(experiment=experiment).values_list(
        "arm", "device_id"
    ):
        arms.setdefault(arm, []).append(str(device_id))
    return arms


def experiment_arm_stats(
    *, experiment: Experiment, until: datetime, p95_of: Iterable[str] = ()
) -> dict[int, dict[str, dict[str, DeviceSummary]]]:
    """Per arm, what each of its devices reported for the arm's version since the start
    (count and sum per metric, aggregated in SQL: one query per arm)."""
    assert experiment.started_at is not None
    out: dict[int, dict[str, dict[str, DeviceSummary]]] = {}
    for index, arm in enumerate(experiment.arms):
        out[index] = device_metric_stats(
            version_ids=[int(arm["version_id"])],
            since=experiment.started_at,
            until=until,
            devices=ExperimentAssignment.objects.filter(experiment=experiment, arm=index).values("device_id"),
            p95_of=p95_of,
        )
    return out


def experiment_decisions(*, experiment: Experiment) -> QuerySet[ExperimentDecision]:
    return ExperimentDecision.objects.filter(experiment=experiment).order_by("created_at", "id")


def experiment_arm_counts(*, experiment: Experiment) -> list[dict[str, Any]]:
    """Devices per arm, for lists."""
    devices = experiment_arm_devices(experiment=experiment)
    return [
        {
            "arm": i,
            "name": arm.get("name", f"arm{i}"),
            "version_id": arm["version_id"],
            "devices": len(devices.get(i, [])),
        }
        for i, arm in enumerate(experiment.arms)
    ]
