"""Personalisation against the real server: accuracies arrive as metric samples, nothing else."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from devices_agent.local_train import apply_delta, train_local

from config.demo.nets import initial_weights
from devices_agent.agent import Agent
from devices_agent.codecs import encode_tensors
from devices_agent.config import AgentConfig
from devices_agent.data import client_dataset, load_digits_split
from tests.devices_agent.agent_helpers import linear_onnx

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _stack(transactional_db: Any, live_stack: Any) -> Iterator[Any]:
    yield live_stack


def test_live_device_reports_global_and_personal_accuracy(_stack: Any, tmp_path: Path) -> None:
    from fleet.selectors.personalisation import personalisation_summary
    from fleet.services.devices import device_assign_version
    from fleet.services.enrollment import enrollment_token_create
    from models_registry.models import ModelFamily
    from models_registry.services import version_create

    x_train, y_train, _, _ = load_digits_split(seed=0)
    start = initial_weights("mlp", seed=0)
    delta = train_local(
        arch="mlp",
        global_weights=start,
        x=x_train[:300],
        y=y_train[:300],
        epochs=3,
        batch_size=32,
        lr=0.01,
        optimizer="adam",
        seed=0,
    ).delta
    family = ModelFamily.objects.create(name="personal-e2e", arch="mlp", input_shape=[64], num_classes=10)
    version = version_create(
        family=family, weights=encode_tensors(apply_delta(start, delta)), onnx=linear_onnx(), arch="mlp"
    )
    _, token = enrollment_token_create(actor=None, name="personal-e2e", max_uses=1)
    config = AgentConfig(
        server_url=_stack.url,
        state_dir=tmp_path,
        enrollment_token=token,
        name="personal-board",
        websocket=False,
        health_check_runs=5,
        personalise=True,
        personalise_epochs=3,
    )
    agent = Agent(
        config=config,
        rng=random.Random(1),
        sleep=lambda s: None,
        local_data=client_dataset(client_index=0, n_clients=10, alpha=0.05, seed=0),
    )
    agent.enroll()
    device_assign_version(actor=None, device_id=agent.device_id, version_id=version.pk)
    for _ in range(4):
        agent.step()
        if agent.state.current_version_id() == version.pk and agent.outbox.pending() == 0:
            break
    agent.close()
    assert (tmp_path / "personal" / "head.safetensors").exists()
    [row] = personalisation_summary()["devices"]
    assert row["device_id"] == agent.device_id and row["version_id"] == version.pk
    assert row["personal_accuracy"] > row["global_accuracy"]
