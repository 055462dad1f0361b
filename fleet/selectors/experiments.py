"""Reads for A/B experiments: arm membership and the samples each arm produced."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from django.db.models import QuerySet

from fleet.models import Experiment, ExperimentAssignment, ExperimentDecision
from fleet.selectors.rollouts import metric_arrays


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


def experiment_arm_samples(
    *, experiment: Experiment, until: datetime
) -> dict[int, dict[str, npt.NDArray[np.float64]]]:
    """Per arm, the raw metric arrays its devices reported for its version since the start."""
    assert experiment.started_at is not None
    devices = experiment_arm_devices(experiment=experiment)
    out: dict[int, dict[str, npt.NDArray[np.float64]]] = {}
    for index, arm in enumerate(experiment.arms):
        out[index] = metric_arrays(
            version_ids=[int(arm["version_id"])],
            since=experiment.started_at,
            until=until,
            device_ids=devices.get(index, []),
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
