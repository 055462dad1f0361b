"""A model the project never saw, learning on boards run by ``flotilla-agent run``.

The family is registered through the REST API with a bundle made from a plain nn.Module
(as a user would), three ``flotilla-agent run`` processes enroll through a recording
proxy, and the test plays the applications beside them over their local API sockets:
labelled history, then predictions with feedback. A federated job trains the program on
the boards' own examples; the family has no test set, so every version is evaluated on
the boards' holdouts. Every byte the agents send is inspected: none of the examples.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest

from devices_agent.data import activity_windows
from devices_agent.local_client import AgentClient, LocalApiError
from tests.devices_agent.agent_helpers import CuttingProxy

pytestmark = pytest.mark.slow

BOARDS = 3


def _wait(check: Callable[[], bool], *, timeout: float, what: str, logs: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{logs()[-4000:]}")


def _register_family(url: str, token: str) -> dict[str, Any]:
    """Family, bundle upload and promotion through the operator API, as a user would."""
    import httpx
    import torch

    from devices_agent.program import make_bundle

    api = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=60)
    family = api.post(
        "/api/v1/models/",
        json={"name": "gestures", "task": "classification", "input_shape": [3, 64], "num_classes": 6},
    )
    assert family.status_code == 201, family.text

    class Net(torch.nn.Module):  # the user's own architecture, unknown to the project
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(3, 8, 5, padding=2)
            self.head = torch.nn.Linear(8 * 32, 6)

        def forward(self, x: Any) -> Any:
            return self.head(torch.flatten(torch.max_pool1d(torch.relu(self.conv(x)), 2), 1))

    torch.manual_seed(0)
    bundle = make_bundle(Net(), torch.zeros(2, 3, 64))
    uploaded = api.post(
        "/api/v1/model-versions/",
        data={"family": str(family.json()["id"])},
        files={
            "weights": ("weights.safetensors", bundle.weights),
            "onnx": ("model.onnx", bundle.onnx),
            "program": ("program.json", bundle.program),
        },
    )
    assert uploaded.status_code == 201, uploaded.text
    version = uploaded.json()
    assert version["head"] == ["head.weight", "head.bias"]
    assert {a["kind"] for a in version["artifacts"]} == {"weights", "onnx", "program"}
    for stage in ("staging", "production"):
        promoted = api.post(f"/api/v1/model-versions/{version['id']}/promote/", json={"stage": stage})
        assert promoted.status_code == 200, promoted.text
    return version


@pytest.fixture
def boards(
    transactional_db: Any, live_stack: Any, tmp_path: Path, make_user: Any
) -> Iterator[dict[str, Any]]:
    from rest_framework.authtoken.models import Token

    from fleet.models import DeviceGroup, UpdatePolicy
    from fleet.services.enrollment import enrollment_token_create

    admin = make_user("admin")
    token = Token.objects.create(user=admin).key
    version = _register_family(live_stack.url, token)
    policy = UpdatePolicy.objects.create(name="lab", training={"allowed": True})
    group = DeviceGroup.objects.create(name="wrists", policy=policy)
    _, enrollment = enrollment_token_create(actor=None, name="wrists", group=group, max_uses=BOARDS)
    target = urlparse(live_stack.url)
    proxy = CuttingProxy(target.hostname or "127.0.0.1", int(target.port or 80))
    processes: list[subprocess.Popen[bytes]] = []
    sockets: list[str] = []
    for i in range(BOARDS):
        state = tmp_path / f"board{i}"
        config = tmp_path / f"board{i}.json"
        config.write_text(
            json.dumps(
                {
                    "server_url": proxy.url,
                    "allow_insecure_http": True,
                    "state_dir": str(state),
                    "enrollment_token": enrollment,
                    "name": f"wrist-{i}",
                    "heartbeat_interval_s": 1.5,
                    "health_check_runs": 3,
                    "personalise_min_examples": 20,
                    "drift_every": 2,
                    "device_seed": i,
                }
            )
        )
        log = open(tmp_path / f"board{i}.log", "wb")  # noqa: SIM115 - the child owns it
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "devices_agent", "run", "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        sockets.append(str(state / "agent.sock"))
    logs = lambda: "\n".join((tmp_path / f"board{i}.log").read_text(errors="replace") for i in range(BOARDS))  # noqa: E731
    try:
        yield {
            "version": version,
            "group": group,
            "proxy": proxy,
            "sockets": sockets,
            "logs": logs,
            "processes": processes,
        }
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        proxy.close()


def _assign_everyone(group: Any, version_id: int) -> None:
    from fleet.models import Device
    from fleet.services.devices import device_assign_version

    for device_id in Device.objects.filter(groups=group).values_list("pk", flat=True):
        device_assign_version(actor=None, device_id=device_id, version_id=version_id)


def _installed(socket_path: str) -> bool:
    try:
        with AgentClient(socket_path, timeout=5) as client:
            return client.status()["version_id"] is not None
    except (OSError, LocalApiError):
        return False


def test_a_new_family_learns_on_boards_run_by_the_agent(boards: dict[str, Any]) -> None:
    from fleet.models import Device, DriftReport, MetricSample
    from models_registry.models import ModelVersion
    from training import services
    from training.models import ClientUpdate, FederatedJob, FederatedRound

    logs = boards["logs"]
    _wait(
        lambda: Device.objects.filter(groups=boards["group"]).count() == BOARDS,
        timeout=90,
        what="enrollment",
        logs=logs,
    )
    _assign_everyone(boards["group"], boards["version"]["id"])
    _wait(
        lambda: all(_installed(s) for s in boards["sockets"]),
        timeout=90,
        what="the model on every board",
        logs=logs,
    )

    sent_windows: list[np.ndarray] = []
    clients = [AgentClient(s) for s in boards["sockets"]]
    for i, client in enumerate(clients):
        x, y = activity_windows(user=i, n=160, seed=0)
        sent_windows.append(x)
        for start in range(0, 120, 40):
            client.add_samples(x[start : start + 40], y[start : start + 40])
        for j in range(120, 160):
            answer = client.predict(x[j])
            assert answer["model"] in ("global", "personal") and 0 <= answer["label"] < 6
            client.feedback(answer["prediction_id"], int(y[j]))
        status = client.status()
        assert status["examples"] == 160 and status["holdout_examples"] > 10
    _wait(
        lambda: Device.objects.filter(groups=boards["group"], state__local_examples__gte=100).count()
        == BOARDS,
        timeout=60,
        what="every board to report its example counts",
        logs=logs,
    )

    family_version = ModelVersion.objects.get(pk=boards["version"]["id"])
    job = services.job_create(
        actor=None,
        family=family_version.family,
        base_version=family_version,
        target_group=boards["group"],
        rounds=3,
        min_clients=BOARDS,
        quorum=BOARDS,
        local_epochs=3,
        lr=0.05,
        codec="int8",
        round_deadline_s=120,
    )
    services.job_start(job_id=job.pk, actor=None)
    _wait(
        lambda: FederatedJob.objects.get(pk=job.pk).status == "succeeded",
        timeout=420,
        what="the job",
        logs=logs,
    )

    rounds = list(FederatedRound.objects.filter(job=job).order_by("number"))
    assert [(r.kind, r.status) for r in rounds] == [("train", "done")] * 3 + [("evaluate", "done")]
    # No test set: each version was judged on the boards' holdouts, by the round after it.
    for rnd in rounds[:3]:
        assert rnd.evaluation == "federated" and rnd.metric_name == "accuracy", rnd.evaluation_detail
        assert rnd.evaluation_detail["devices"] == BOARDS and 0.0 <= rnd.metric <= 1.0
        assert rnd.version.metrics["evaluation"] == "federated"
    job = FederatedJob.objects.get(pk=job.pk)
    assert job.best_version_id in {r.version_id for r in rounds[:3]} and job.best_metric is not None
    updates = ClientUpdate.objects.filter(round__job=job, round__kind="train", status="accepted")
    assert updates.count() == 3 * BOARDS
    assert all(u.metrics.get("backend_torch") == 1.0 for u in updates)
    # What only the boards know reached the server as numbers: personalisation, drift.
    devices = Device.objects.filter(groups=boards["group"])
    assert MetricSample.objects.filter(device__in=devices, name="personal_accuracy").exists()
    assert MetricSample.objects.filter(device__in=devices, name="correct").count() >= 3 * 40
    assert DriftReport.objects.filter(device__in=devices).exists()

    # Every byte the agents sent: none of the examples, raw or as text.
    sent = b"".join(boards["proxy"].upstream_bytes)
    assert len(sent) > 10_000
    for windows in sent_windows:
        for window in windows[::20]:
            raw = np.ascontiguousarray(window, dtype="<f4").tobytes()
            assert raw[64:96] not in sent
            text = ",".join(repr(float(v)) for v in window.ravel()[10:13])
            assert text.encode() not in sent
    for client in clients:
        client.close()
