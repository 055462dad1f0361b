"""The agent against the real server: uvicorn + Celery on the test database, over real HTTP.

Rows are written with the services (tokens, versions, assignments); the agent runs in this
process and talks to the live web process, directly or through a loopback proxy that cuts
connections.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from devices_agent.agent import Agent
from devices_agent.config import AgentConfig
from tests.devices_agent.agent_helpers import CuttingProxy, RewritingProxy, Signer, linear_onnx

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _stack(transactional_db: Any, live_stack: Any) -> Iterator[Any]:
    yield live_stack


def _token(max_uses: int = 1, **fields: Any) -> str:
    from fleet.services.enrollment import enrollment_token_create

    _, token = enrollment_token_create(actor=None, name="agent-e2e", max_uses=max_uses, **fields)
    return token


def _version(onnx: bytes) -> Any:
    """A version of the test family in production, as a device not in a canary group needs."""
    from models_registry.models import ModelFamily
    from models_registry.services import version_create, version_promote

    family = ModelFamily.objects.filter(name="agent-e2e").first()
    if family is None:
        family = ModelFamily.objects.create(name="agent-e2e", input_shape=[64], num_classes=10)
    version = version_create(family=family, onnx=onnx)
    for stage in ("staging", "production"):
        version = version_promote(version=version, stage=stage)
    return version


def _device_id(agent: Agent) -> str:
    device_id = agent.device_id
    assert device_id is not None
    return device_id


def _assign(agent: Agent, version: Any) -> int:
    from fleet.services.devices import device_assign_version

    deployment = device_assign_version(actor=None, device_id=agent.device_id, version_id=version.pk)
    assert deployment is not None
    return int(deployment.pk)


def _deployment(deployment_id: int) -> Any:
    from fleet.models import Deployment

    return Deployment.objects.get(pk=deployment_id)


def _events(deployment_id: int) -> list[str]:
    from fleet.models import DeploymentEvent

    return list(DeploymentEvent.objects.filter(deployment_id=deployment_id).values_list("state", flat=True))


def _agent(url: str, root: Path, token: str, **overrides: Any) -> Agent:
    config = AgentConfig(
        server_url=url,
        state_dir=root,
        enrollment_token=token,
        name=root.name,
        websocket=False,
        health_check_runs=5,
        allow_insecure_http=True,
        **overrides,
    )
    return Agent(config=config, rng=random.Random(1), sleep=lambda s: None)


def _running(agent: Agent, version: Any, deployment_id: int) -> None:
    """Bring the agent to ``version`` through a successful deployment."""
    for _ in range(3):
        outcome = agent.step().outcome
        if outcome is not None and outcome.action == "active":
            break
    assert _deployment(deployment_id).state == "active"
    assert agent.state.current_version_id() == version.pk


def test_enroll_heartbeat_install_and_report_metrics(_stack: Any, tmp_path: Path) -> None:
    from fleet.models import Device, MetricSample
    from models_registry.signing import signing_public_key_b64

    agent = _agent(_stack.url, tmp_path / "board", _token())
    first = agent.step()
    assert first.ok
    device = Device.objects.get(pk=_device_id(agent))
    assert device.status == "online" and device.name == "board"
    creds = agent.state.credentials()
    assert creds is not None and creds.signing_public_key == signing_public_key_b64()

    version = _version(linear_onnx(seed=11))
    deployment_id = _assign(agent, version)
    _running(agent, version, deployment_id)
    assert _events(deployment_id) == [
        "pending",
        "downloading",
        "verifying",
        "installing",
        "health_check",
        "active",
    ]
    device.refresh_from_db()
    assert device.running_version_id == version.pk

    for i in range(5):
        answer = agent.local.predict([i / 10.0] * 64)["predictions"][0]
        agent.local.feedback(answer["prediction_id"], i)
    agent.step()
    names = set(MetricSample.objects.filter(device=device).values_list("name", flat=True))
    assert {"latency_ms", "confidence", "correct", "cpu_percent", "ram_mb"} <= names
    assert MetricSample.objects.filter(device=device, name="correct", version_id=version.pk).count() == 5
    agent.close()


def test_download_resumes_after_a_cut_connection_and_after_a_restart(_stack: Any, tmp_path: Path) -> None:
    model = linear_onnx(seed=12, hidden=512)
    assert len(model) > 100_000
    target = urlparse(_stack.url)
    proxy = CuttingProxy(target.hostname or "127.0.0.1", target.port or 80, cut_after=40_000, max_cuts=1)
    try:
        # A connection cut mid-body; the updater's next attempt resumes with Range.
        agent = _agent(proxy.url, tmp_path / "a", _token())
        agent.step()
        version = _version(model)
        deployment_id = _assign(agent, version)
        proxy.upstream_bytes.clear()
        _running(agent, version, deployment_id)
        assert proxy.cuts == 1
        sent = b"".join(proxy.upstream_bytes).lower()
        assert b"range: bytes=" in sent and b"if-range:" in sent
        agent.close()

        # The agent dies after a cut (one download attempt per heartbeat) and a new
        # process resumes from the part file.
        proxy.cuts = 0
        root = tmp_path / "b"
        agent = _agent(proxy.url, root, _token())
        agent.step()
        assert agent.updater is not None
        agent.updater.download_attempts = 1
        deployment_id = _assign(agent, version)
        outcome = agent.step().outcome
        assert outcome is not None and outcome.action == "retry"
        part = agent.state.part_path(version.artifacts.get(kind="onnx").sha256)
        partial = part.stat().st_size
        assert 0 < partial < len(model)
        agent.close()

        restarted = _agent(proxy.url, root, "")
        proxy.upstream_bytes.clear()
        _running(restarted, version, deployment_id)
        assert f"range: bytes={partial}-".encode() in b"".join(proxy.upstream_bytes).lower()
        restarted.close()
    finally:
        proxy.close()


def _corrupt_stored_file(version: Any) -> None:
    from django.core.files.storage import default_storage

    artifact = version.artifacts.get(kind="onnx")
    path = Path(default_storage.path(artifact.file.name))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["corrupted", "wrongly_signed"])
def test_bad_artifacts_are_rejected_and_the_old_model_kept(_stack: Any, tmp_path: Path, damage: str) -> None:
    from fleet.models import Device

    # On the path between board and server: what it changes, the signature must catch.
    proxy = RewritingProxy(_stack.url)
    agent = _agent(proxy.url, tmp_path / "board", _token())
    agent.step()
    good = _version(linear_onnx(seed=13))
    _running(agent, good, _assign(agent, good))

    bad = _version(linear_onnx(seed=14 if damage == "corrupted" else 15))
    if damage == "corrupted":
        _corrupt_stored_file(bad)
    else:
        _, forged = Signer(seed=b"\x42" * 32).sign(b"whatever")
        proxy.rewrite = lambda answer: _with_artifact(answer, statement_signature=forged)
    deployment_id = _assign(agent, bad)
    outcome = agent.step().outcome
    assert outcome is not None and outcome.action == "failed"
    deployment = _deployment(deployment_id)
    assert deployment.state == "failed"
    assert ("SHA-256" if damage == "corrupted" else "signature") in deployment.error
    assert agent.state.current_version_id() == good.pk
    assert not agent.state.part_path(bad.artifacts.get(kind="onnx").sha256).exists()
    device = Device.objects.get(pk=_device_id(agent))
    assert device.running_version_id == good.pk
    # The server points the device back at what it runs; the next heartbeat is calm.
    assert agent.step().outcome.action == "current"
    agent.close()
    proxy.close()


def _with_artifact(answer: dict[str, Any], **changes: Any) -> dict[str, Any]:
    desired = answer.get("desired")
    if desired:
        answer["desired"] = {**desired, "artifact": {**desired["artifact"], **changes}}
    return answer


def _served(proxy: RewritingProxy, version: Any) -> dict[str, Any]:
    """The last desired state the server sent naming ``version``."""
    for answer in reversed(proxy.answers):
        desired = answer.get("desired")
        if desired and desired["version_id"] == version.pk:
            return dict(desired)
    raise AssertionError(f"the server never sent {version.label}")


def test_replayed_older_artifacts_are_refused_and_a_signed_rollback_is_taken(
    _stack: Any, tmp_path: Path
) -> None:
    from fleet.models import Deployment, Device
    from fleet.services.devices import device_assign_version

    proxy = RewritingProxy(_stack.url)
    agent = _agent(proxy.url, tmp_path / "board", _token())
    agent.step()
    v1, v2, v3 = (_version(linear_onnx(seed=seed)) for seed in (40, 41, 42))
    _running(agent, v1, _assign(agent, v1))
    old = _served(proxy, v1)  # validly signed, captured on the way
    assert old["artifact"]["statement"]["version_id"] == v1.pk
    _running(agent, v2, _assign(agent, v2))

    # 1. v3 is wanted; v1's signed artifact is offered in its place: it names v1, not v3.
    deployment_id = _assign(agent, v3)
    proxy.rewrite = lambda answer: _with_artifact(answer, **old["artifact"])
    outcome = agent.step().outcome
    assert outcome is not None and outcome.action == "failed"
    deployment = _deployment(deployment_id)
    assert deployment.state == "failed"
    assert "artifact refused" in deployment.error and f"version_id {v1.pk}, not {v3.pk}" in deployment.error
    assert _events(deployment_id) == ["pending", "failed"]  # refused before any download
    assert agent.state.current_version_id() == v2.pk

    # 2. The whole old desired state replayed under the open deployment: a downgrade.
    deployment_id = _assign(agent, v3)

    def replay(answer: dict[str, Any]) -> dict[str, Any]:
        if answer.get("desired"):
            answer["desired"] = {**old, "deployment_id": answer["desired"]["deployment_id"]}
        return answer

    proxy.rewrite = replay
    outcome = agent.step().outcome
    assert outcome is not None and outcome.action == "failed"
    assert "downgrade refused" in _deployment(deployment_id).error
    assert agent.state.current_version_id() == v2.pk
    proxy.rewrite = None

    # 3. The server itself sends v1 without calling it a rollback: refused the same way.
    deployment_id = _assign(agent, v1)
    outcome = agent.step().outcome
    assert outcome is not None and outcome.action == "failed"
    assert "downgrade refused" in _deployment(deployment_id).error
    device = Device.objects.get(pk=_device_id(agent))
    assert device.running_version_id == v2.pk and agent.state.current_version_id() == v2.pk

    # 4. An explicit rollback: signed for this deployment and this device, and taken.
    rollback = device_assign_version(actor=None, device_id=device.pk, version_id=v1.pk, rollback=True)
    assert rollback is not None and Deployment.objects.get(pk=rollback.pk).rollback
    _running(agent, v1, rollback.pk)
    statement = _served(proxy, v1)["artifact"]["statement"]
    assert statement["rollback"] and statement["deployment_id"] == rollback.pk
    assert statement["device_id"] == str(device.pk)
    agent.close()
    proxy.close()


def test_failed_health_check_rolls_back_locally_and_reports_it(_stack: Any, tmp_path: Path) -> None:
    from fleet.models import Device, UpdatePolicy

    agent = _agent(_stack.url, tmp_path / "board", _token())
    agent.step()
    good = _version(linear_onnx(seed=16))
    _running(agent, good, _assign(agent, good))

    strict = UpdatePolicy.objects.create(name="agent-e2e-strict", health_latency_budget_ms=0.0001)
    Device.objects.filter(pk=_device_id(agent)).update(policy=strict)
    slow = _version(linear_onnx(seed=17))
    deployment_id = _assign(agent, slow)
    outcome = agent.step().outcome
    assert outcome is not None and outcome.action == "rolled_back"
    deployment = _deployment(deployment_id)
    assert deployment.state == "rolled_back" and "exceeds the budget" in deployment.error
    assert _events(deployment_id)[-2:] == ["health_check", "rolled_back"]
    assert agent.state.current_version_id() == good.pk
    assert Device.objects.get(pk=_device_id(agent)).running_version_id == good.pk
    agent.close()


def test_outage_loses_no_metrics_and_heartbeats_back_off(_stack: Any, tmp_path: Path) -> None:
    from fleet.models import Device, MetricSample

    agent = _agent(_stack.url, tmp_path / "board", _token(), backoff_base_s=1.0, backoff_cap_s=30.0)
    agent.step()
    agent.flush_metrics()
    device = Device.objects.get(pk=_device_id(agent))
    before = MetricSample.objects.filter(device=device).count()
    _stack.stop("web")
    try:
        for i in range(50):
            agent.outbox.add("latency_ms", float(i))
        delays = []
        for _ in range(6):
            result = agent.step()
            assert not result.ok
            delays.append(result.interval_s)
        assert all(0.0 <= d <= 30.0 for d in delays)
        assert agent.backoff.attempt == 6
        assert agent.outbox.pending() >= 50
    finally:
        _stack.start_web()
    assert agent.step().ok
    while agent.outbox.pending():
        agent.flush_metrics()
    latencies = MetricSample.objects.filter(device=device, name="latency_ms").values_list("value", flat=True)
    assert sorted(latencies) == [float(i) for i in range(50)]  # each once: none lost, none doubled
    assert MetricSample.objects.filter(device=device).count() >= before + 50
    agent.close()


def test_simulated_fleet_enrolls_reports_metrics_and_updates(_stack: Any, tmp_path: Path) -> None:
    import time

    from django.db.models import Avg

    from devices_agent.simulate import Fleet
    from fleet.models import Device, MetricSample

    fleet = Fleet(
        server_url=_stack.url,
        # The simulator's boards tag themselves with their profile (profile-slow, ...).
        token=_token(max_uses=4, device_tags_allowed=["simulated", "profile-*"]),
        devices=4,
        state_root=tmp_path,
        heartbeat_interval_s=0.5,
        stagger_s=0.5,
        threads=2,
        train=False,
        inferences_per_cycle=3,
        slow_fraction=0.5,
        slow_delay_ms=20.0,
    )
    assert sorted(d.profile for d in fleet.devices) == ["fast", "fast", "slow", "slow"]
    fleet.start()
    try:
        deadline = time.monotonic() + 60
        while not all(d.steps > 0 for d in fleet.devices):
            assert time.monotonic() < deadline, [d.last_error for d in fleet.devices]
            time.sleep(0.2)
        ids = [d.agent.device_id for d in fleet.devices]
        tags = Device.objects.filter(pk__in=ids).values_list("tags", flat=True)
        assert sum("profile-slow" in t for t in tags) == 2
        version = _version(linear_onnx(seed=21))
        Device.objects.filter(pk__in=ids).update(desired_version=version)  # a bulk assignment
        while Device.objects.filter(pk__in=ids, running_version=version).count() < 4:
            assert time.monotonic() < deadline, [d.last_error for d in fleet.devices]
            time.sleep(0.2)
        while MetricSample.objects.filter(device_id__in=ids, version=version, name="correct").count() < 12:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        fleet.stop()
    assert all(d.failures == 0 and not d.dead for d in fleet.devices)
    by_profile = {}
    for profile in ("fast", "slow"):
        devices = [d.agent.device_id for d in fleet.devices if d.profile == profile]
        by_profile[profile] = MetricSample.objects.filter(
            device_id__in=devices, version=version, name="latency_ms"
        ).aggregate(mean=Avg("value"))["mean"]
    assert by_profile["slow"] >= 20.0 > by_profile["fast"]
