"""Fixtures for federated-round tests: a model family with weights, a group of devices."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass
class Fleet:
    """What a round test needs: the family, its first version, a group and its devices."""

    family: Any
    version: Any
    group: Any
    devices: list[Any]
    secrets: list[str]


def make_fleet(
    *, n_devices: int = 3, arch: str = "mlp", name: str = "digits", test_set: bool = True
) -> Fleet:
    """A digits family with a first version (program, weights, ONNX) and ``n_devices`` online devices.

    With ``test_set`` the family has its digits test split registered (central evaluation);
    without, rounds are evaluated on the boards' holdouts.
    """
    from config.demo.seed import digits_datasets
    from fleet.auth import hash_secret, new_secret
    from fleet.models import Device, DeviceGroup
    from tests.bundles import digits_family, digits_version

    family = digits_family(name, arch=arch)
    if test_set:
        digits_datasets(family=family)
    version = digits_version(family, arch=arch)
    group = DeviceGroup.objects.create(name=f"{name}-fleet")
    devices, secrets = [], []
    for i in range(n_devices):
        secret = new_secret()
        device = Device.objects.create(
            name=f"{name}-dev-{i}",
            secret_hash=hash_secret(secret),
            status=Device.Status.ONLINE,
            state={"local_examples": 50, "holdout_examples": 10, "training_backends": ["torch"]},
        )
        device.groups.add(group)
        devices.append(device)
        secrets.append(secret)
    return Fleet(family=family, version=version, group=group, devices=devices, secrets=secrets)


def make_job(fleet: Fleet, **fields: Any) -> Any:
    """A draft job on ``fleet`` with small, fast defaults."""
    from training import services

    defaults: dict[str, Any] = {
        "rounds": 2,
        "min_clients": 2,
        "quorum": 2,
        "local_epochs": 1,
        "round_deadline_s": 120,
    }
    defaults.update(fields)
    return services.job_create(
        actor=None, family=fleet.family, base_version=fleet.version, target_group=fleet.group, **defaults
    )


def upload_deltas(fleet: Fleet, rnd: Any, *, scale: float = 0.01) -> None:
    """Every device selected for ``rnd`` sends a small random delta through the service."""
    import numpy as np

    from devices_agent.codecs import encode_delta
    from training import selectors, services

    weights = selectors.round_weights(rnd=rnd)
    rng = np.random.default_rng(rnd.number)
    devices = {str(d.pk): d for d in fleet.devices}
    for device_id in rnd.selected:
        delta = {k: (rng.standard_normal(v.shape) * scale).astype(np.float32) for k, v in weights.items()}
        _, created = services.update_receive(
            round_id=rnd.pk,
            device=devices[device_id],
            body=encode_delta(delta, codec="none").data,
            num_examples="20",
            metrics=None,
        )
        assert created


@pytest.fixture
def fleet(db: Any) -> Fleet:
    return make_fleet()


@pytest.fixture
def fleet_factory(db: Any) -> Callable[..., Fleet]:
    return make_fleet


def finished_job(fleet: Fleet, *, status: str = "succeeded", rounds_done: int = 1, **fields: Any) -> Any:
    """A job whose round ``rounds_done`` produced a version judged centrally at 0.95."""
    from django.utils import timezone

    from fleet.models import Device
    from models_registry.models import ModelVersion
    from tests.bundles import digits_version
    from training.models import FederatedJob, FederatedRound

    job = make_job(fleet, **fields)
    Device.objects.filter(pk__in=[d.pk for d in fleet.devices]).update(
        running_version=fleet.version, desired_version=fleet.version
    )
    best = None
    for number in range(1, rounds_done + 1):
        version = digits_version(
            fleet.family, seed=number, parent=fleet.version, source=ModelVersion.Source.FEDERATED
        )
        FederatedRound.objects.create(
            job=job,
            number=number,
            status=FederatedRound.Status.DONE,
            base_version=fleet.version,
            version=version,
            metric_name="accuracy",
            metric=0.9 + 0.05 * number / rounds_done,
            evaluation="central",
            finished_at=timezone.now(),
        )
        best = version
    FederatedJob.objects.filter(pk=job.pk).update(
        status=status,
        finished_at=timezone.now() if status == FederatedJob.Status.SUCCEEDED else None,
        current_round=rounds_done,
        best_version=best,
        best_metric=0.95 if best else None,
        best_accuracy=0.95 if best else None,
    )
    job.refresh_from_db()
    return job
