"""A real agent shadows a candidate through the real stack while an application calls predict.

uvicorn + Celery on the test database (``config.stack.Stack`` through ``live_stack``); the
operator starts the shadow over the operator API, the agent learns it from its heartbeat,
fetches the candidate's signed ONNX graph, and the application on the board talks to the
agent's local API over its Unix socket. The answers are the active model's; the server
shows the candidate's agreement per device.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from devices_agent.agent import Agent
from devices_agent.config import AgentConfig
from devices_agent.inference import load_session
from devices_agent.local_client import AgentClient as LocalClient
from tests.devices_agent.agent_helpers import linear_onnx

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _stack(transactional_db: Any, live_stack: Any) -> Iterator[Any]:
    yield live_stack


def _operator_token() -> str:
    from django.contrib.auth.models import Group, User
    from rest_framework.authtoken.models import Token

    user = User.objects.create_user(username="shadow-live-operator", password="pw-Flotilla-1")
    user.groups.add(Group.objects.get_or_create(name="operator")[0])
    return Token.objects.create(user=user).key


def _version(onnx: bytes) -> Any:
    from models_registry.models import ModelFamily
    from models_registry.services import version_create, version_promote

    family = ModelFamily.objects.filter(name="shadow-e2e").first()
    if family is None:
        family = ModelFamily.objects.create(name="shadow-e2e", input_shape=[64], num_classes=10)
    version = version_create(family=family, onnx=onnx)
    for stage in ("staging", "production"):
        version = version_promote(version=version, stage=stage)
    return version


def test_an_agent_shadows_a_candidate_on_live_predictions_and_the_server_shows_agreement(
    _stack: Any, tmp_path: Path
) -> None:
    from fleet.models import Deployment
    from fleet.services.devices import device_assign_version
    from fleet.services.enrollment import enrollment_token_create

    _, token = enrollment_token_create(actor=None, name="shadow-e2e", max_uses=1)
    root = tmp_path / "board"
    config = AgentConfig(
        server_url=_stack.url,
        state_dir=root,
        enrollment_token=token,
        name="shadow-board",
        websocket=False,
        health_check_runs=5,
        allow_insecure_http=True,
    )
    agent = Agent(config=config, rng=random.Random(1), sleep=lambda s: None)
    api = httpx.Client(
        base_url=_stack.url, headers={"Authorization": f"Token {_operator_token()}"}, timeout=60
    )
    app: LocalClient | None = None
    try:
        assert agent.step().ok
        active_bytes, candidate_bytes = linear_onnx(seed=31), linear_onnx(seed=32)
        active, candidate = _version(active_bytes), _version(candidate_bytes)
        deployment = device_assign_version(actor=None, device_id=agent.device_id, version_id=active.pk)
        assert deployment is not None
        for _ in range(3):
            outcome = agent.step().outcome
            if outcome is not None and outcome.action == "active":
                break
        assert Deployment.objects.get(pk=deployment.pk).state == "active"

        started = api.post(
            "/api/v1/shadows/",
            json={
                "version": candidate.pk,
                "device_ids": [agent.device_id],
                "sample_rate": 1.0,
                "max_cpu_percent": 90,
            },
        )
        assert started.status_code == 201, started.text
        shadow_id = started.json()["id"]
        for _ in range(10):
            agent.step()
            if agent.shadow.model is not None:
                break
            time.sleep(0.5)  # another web process may hold the members for its cache's TTL
        assert agent.shadow.model is not None and agent.shadow.model.version_id == candidate.pk
        assert agent.state.current_version_id() == active.pk  # never installed as active

        # The application on the board, over the local API's Unix socket.
        server = agent.start_local_api()
        assert server is not None
        app = LocalClient(str(config.local_api_socket_path))
        x = np.random.default_rng(7).random((30, 64), dtype=np.float32)
        expected = load_session(active_bytes).run(None, {"input": x})[0].astype(np.float64)
        shadowed = load_session(candidate_bytes).run(None, {"input": x})[0]
        for i in range(30):
            answer = app.predict(x[i])
            assert answer["version_id"] == active.pk
            assert answer["outputs"] == [float(v) for v in expected[i]]
            assert answer["label"] == int(expected[i].argmax())
            # Feedback after the shadow answer exists (feedback that overtakes it goes unscored).
            assert agent.shadow.drain()
            app.feedback(answer["prediction_id"], int(shadowed[i].argmax()))  # the candidate's label
        assert agent.shadow.drain()
        agent.step()  # flushes the metrics

        report = api.get(f"/api/v1/shadows/{shadow_id}/")
        assert report.status_code == 200, report.text
        body = report.json()["report"]
        (row,) = body["devices"]
        agree = float(np.mean(expected.argmax(axis=1) == shadowed.argmax(axis=1)))
        assert row["device"] == agent.device_id and row["agreement_samples"] == 30
        assert row["agreement"] == pytest.approx(agree)
        assert row["accuracy"] == pytest.approx(1.0) and row["accuracy_samples"] == 30
        # The same feedback scored the active model: right exactly where the two agreed.
        assert row["active_accuracy"] == pytest.approx(agree) and row["active_accuracy_samples"] == 30
        assert row["latency_ms_samples"] == 30 and row["latency_ms"] > 0
        assert body["fleet"]["agreement"] == pytest.approx(agree) and body["fleet"]["agreement_devices"] == 1

        stopped = api.post(f"/api/v1/shadows/{shadow_id}/stop/", json={})
        assert stopped.status_code == 200
        for _ in range(10):
            agent.step()
            if agent.shadow.model is None:
                break
            time.sleep(0.5)
        assert agent.shadow.model is None
    finally:
        if app is not None:
            app.close()
        api.close()
        agent.close()
