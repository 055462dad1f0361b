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


def make_fleet(*, n_devices: int = 3, arch: str = "mlp", name: str = "digits") -> Fleet:
    """Rows for a family with signed initial weights and ``n_devices`` online devices."""
    from django.core.files.base import ContentFile

    from config.demo.nets import initial_weights
    from devices_agent.codecs import encode_tensors
    from fleet.auth import hash_secret, new_secret
    from fleet.models import Device, DeviceGroup
    from models_registry.models import Artifact, ModelFamily, ModelVersion
    from models_registry.signing import sign_digest
    from training.storage import sha256_hex

    family = ModelFamily.objects.create(name=name, arch=arch, input_shape=[64], num_classes=10)
    version = ModelVersion.objects.create(family=family, number=1)
    data = encode_tensors(initial_weights(arch, seed=0))
    digest = sha256_hex(data)
    artifact = Artifact(
        version=version, kind="weights", sha256=digest, size=len(data), signature=sign_digest(digest)
    )
    artifact.file.save(f"{name}-v1.safetensors", ContentFile(data), save=False)
    artifact.save()
    group = DeviceGroup.objects.create(name=f"{name}-fleet")
    devices, secrets = [], []
    for i in range(n_devices):
        secret = new_secret()
        device = Device.objects.create(
            name=f"{name}-dev-{i}",
            secret_hash=hash_secret(secret),
            status=Device.Status.ONLINE,
            state={"local_examples": 50},
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
        "export_onnx": False,
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
