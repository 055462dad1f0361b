"""Shadow deployments on the board: sampling, the budget, answers unchanged, feedback, refusals."""

from __future__ import annotations

import itertools
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices_agent.agent import Agent
from devices_agent.config import AgentConfig
from devices_agent.family import FamilySpec
from devices_agent.inference import load_session
from devices_agent.local_api import ActiveModel, LocalApiServer, LocalService
from devices_agent.local_client import AgentClient as LocalClient
from devices_agent.samples import SampleStore
from devices_agent.shadow import ShadowModel, ShadowRunner
from tests.devices_agent.agent_helpers import ScriptedServer, Signer, linear_onnx
from tests.devices_agent.test_agent import FakeFleet

SPEC = FamilySpec(task="classification", input_shape=(64,), num_classes=10)
SIGNER = Signer()


class Recorded:
    def __init__(self) -> None:
        self.samples: list[tuple[str, float, int | None]] = []

    def __call__(self, name: str, value: float, version_id: int | None) -> None:
        self.samples.append((name, value, version_id))

    def of(self, name: str) -> list[tuple[float, int | None]]:
        return [(v, vid) for n, v, vid in self.samples if n == name]


class SlowSession:
    """An ONNX Runtime session that takes at least ``delay_s`` per run (a heavy candidate)."""

    def __init__(self, session: Any, delay_s: float) -> None:
        self.session = session
        self.delay_s = delay_s

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def run(self, names: Any, feeds: Any) -> Any:
        time.sleep(self.delay_s)
        return self.session.run(names, feeds)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _service(tmp_path: Path, record: Recorded, shadow: ShadowRunner | None, name: str) -> LocalService:
    active = ActiveModel(version_id=7, spec=SPEC, session=load_session(linear_onnx(seed=0)))
    store = SampleStore(tmp_path / f"{name}.sqlite3", max_examples=50)
    service = LocalService(model=lambda: active, store=store, record=record, shadow=shadow)
    service._ids = itertools.count(1)  # the same prediction ids in both services
    return service


def _shadow(session: Any = None, **policy: Any) -> ShadowModel:
    return ShadowModel(
        shadow_id=1,
        version_id=8,
        spec=SPEC,
        session=session if session is not None else load_session(linear_onnx(seed=1)),
        **policy,
    )


def test_answers_are_the_active_models_byte_for_byte_while_shadow_runs(tmp_path: Path) -> None:
    record = Recorded()
    runner = ShadowRunner(record=record, seed=0)
    runner.set_model(_shadow(sample_rate=1.0))
    with_shadow = _service(tmp_path, record, runner, "a")
    without = _service(tmp_path, Recorded(), None, "b")
    x = np.random.default_rng(3).random((40, 64), dtype=np.float32)
    for i in range(40):
        one = json.dumps(with_shadow.predict(x[i])).encode()
        assert one == json.dumps(without.predict(x[i])).encode()
    batch = json.dumps(with_shadow.predict(x, batch=True)).encode()
    assert batch == json.dumps(without.predict(x, batch=True)).encode()
    assert runner.drain()
    # The candidate did run on every input, and it often disagrees: it is another model.
    agreement = record.of("shadow_agreement")
    assert len(agreement) == 80 and {vid for _, vid in agreement} == {8}
    assert 0 < sum(v for v, _ in agreement) < 80
    assert record.of("shadow_latency_ms") and all(vid == 8 for _, vid in record.of("shadow_latency_ms"))
    runner.close()


def test_answers_over_the_socket_are_the_active_models(tmp_path: Path) -> None:
    record = Recorded()
    runner = ShadowRunner(record=record, seed=0)
    runner.set_model(_shadow(sample_rate=1.0))
    service = _service(tmp_path, record, runner, "a")
    server = LocalApiServer(service, socket_path=tmp_path / "agent.sock", mode=0o600)
    server.start()
    client = LocalClient(str(tmp_path / "agent.sock"))
    try:
        x = np.random.default_rng(4).random((10, 64), dtype=np.float32)
        active = load_session(linear_onnx(seed=0)).run(None, {"input": x})[0]
        answers = client.predict(x, batch=True)
        assert [a["outputs"] for a in answers] == [
            [float(v) for v in row] for row in active.astype(np.float64)
        ]
        assert [a["label"] for a in answers] == [int(v) for v in active.argmax(axis=1)]
        assert runner.drain() and len(record.of("shadow_agreement")) == 10
    finally:
        client.close()
        server.stop()
        runner.close()


@pytest.mark.parametrize("rate", [0.0, 0.25, 1.0])
def test_predictions_are_sampled_at_the_policys_rate(tmp_path: Path, rate: float) -> None:
    record = Recorded()
    runner = ShadowRunner(record=record, seed=1, threaded=False)
    runner.set_model(_shadow(sample_rate=rate))
    service = _service(tmp_path, record, runner, "a")
    x = np.random.default_rng(0).random((400, 64), dtype=np.float32)
    for start in range(0, 400, 8):
        service.predict(x[start : start + 8], batch=True)
    shadowed = len(record.of("shadow_agreement"))
    if rate == 0.0:
        assert shadowed == 0
    elif rate == 1.0:
        assert shadowed == 400
    else:
        assert 60 <= shadowed <= 140  # 100 expected; the generator is seeded


def test_a_candidate_over_the_time_budget_is_skipped_and_probed_again_later(tmp_path: Path) -> None:
    record = Recorded()
    clock = Clock()
    runner = ShadowRunner(record=record, seed=0, threaded=False, clock=clock, probe_every_s=30.0)
    slow = SlowSession(load_session(linear_onnx(seed=1)), delay_s=0.02)
    # Average latency (>= 20 ms) x sample rate 1 is over 5 ms per prediction.
    runner.set_model(_shadow(session=slow, sample_rate=1.0, budget_ms=5.0))
    service = _service(tmp_path, record, runner, "a")
    x = np.random.default_rng(0).random((20, 64), dtype=np.float32)
    for i in range(20):
        clock.now += 1.0
        service.predict(x[i])
    assert len(record.of("shadow_agreement")) == 1  # the first run measured it
    assert runner.average_ms() is not None and runner.average_ms() >= 20.0
    assert runner.take_skipped() == (19, 8)
    clock.now += 31.0
    service.predict(x[0])
    assert len(record.of("shadow_agreement")) == 2  # one probe refreshes the average
    service.predict(x[1])
    assert len(record.of("shadow_agreement")) == 2 and runner.take_skipped() == (1, 8)


def test_the_cpu_budget_depends_on_the_prediction_rate(tmp_path: Path) -> None:
    record = Recorded()
    clock = Clock()
    runner = ShadowRunner(record=record, seed=0, threaded=False, clock=clock)
    slow = SlowSession(load_session(linear_onnx(seed=1)), delay_s=0.02)
    runner.set_model(_shadow(session=slow, sample_rate=1.0, max_cpu_percent=10.0))
    service = _service(tmp_path, record, runner, "a")
    x = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    # One prediction every 10 s: >= 20 ms each is about 0.2 % of a core, within 10 %.
    for _ in range(5):
        clock.now += 10.0
        service.predict(x[0])
    assert len(record.of("shadow_agreement")) == 5 and runner.take_skipped()[0] == 0
    # A hundred a second: >= 200 % of a core; the shadow steps aside.
    for _ in range(200):
        clock.now += 0.01
        service.predict(x[0])
    shadowed = len(record.of("shadow_agreement")) - 5
    skipped, version = runner.take_skipped()
    assert version == 8 and skipped >= 190 and shadowed + skipped == 200


def test_feedback_on_a_shadowed_prediction_records_shadow_correct(tmp_path: Path) -> None:
    record = Recorded()
    runner = ShadowRunner(record=record, seed=0, threaded=False)
    # The candidate is a copy of the active model: it agrees and is right when it is.
    runner.set_model(_shadow(session=load_session(linear_onnx(seed=0)), sample_rate=1.0))
    service = _service(tmp_path, record, runner, "a")
    x = np.random.default_rng(5).random((2, 64), dtype=np.float32)
    first = service.predict(x[0])["predictions"][0]
    second = service.predict(x[1])["predictions"][0]
    assert record.of("shadow_agreement") == [(1.0, 8), (1.0, 8)]
    service.feedback(first["prediction_id"], first["label"])
    service.feedback(second["prediction_id"], (second["label"] + 1) % 10)
    assert record.of("correct") == [(1.0, 7), (0.0, 7)]
    assert record.of("shadow_correct") == [(1.0, 8), (0.0, 8)]
    # A prediction nobody shadowed records only the active model's figure.
    runner.set_model(None)
    third = service.predict(x[0])["predictions"][0]
    service.feedback(third["prediction_id"], third["label"])
    assert len(record.of("shadow_correct")) == 2


def test_regression_agreement_uses_the_tolerance() -> None:
    record = Recorded()
    spec = FamilySpec(task="regression", input_shape=(64,), output_size=10)
    runner = ShadowRunner(record=record, seed=0, threaded=False)
    session = load_session(linear_onnx(seed=0))
    runner.set_model(ShadowModel(shadow_id=1, version_id=8, spec=spec, session=session, tolerance=0.5))
    x = np.random.default_rng(0).random((2, 64), dtype=np.float32)
    out = session.run(None, {"input": x})[0].astype(np.float64)
    runner.offer(ids=[1, 2], x=x, active_outputs=np.vstack([out[0] + 0.1, out[1] + 2.0]), spec=spec)
    assert record.of("shadow_agreement") == [(1.0, 8), (0.0, 8)]
    assert runner.feedback(1, [float(v) for v in out[0]]) == "shadow_error"
    assert record.of("shadow_error") == [(0.0, 8)]


# --- the agent fetches the candidate like an update, and never installs it ---------------------


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    server = ScriptedServer()
    fleet = FakeFleet(server)
    config = AgentConfig(
        server_url=server.url,
        state_dir=tmp_path / "state",
        enrollment_token="good-token",
        name="board-1",
        websocket=False,
        allow_insecure_http=True,
    )
    board = Agent(config=config, rng=random.Random(0), sleep=lambda s: None)
    board.enroll()
    yield board, fleet
    board.close()
    server.close()


def _serve(fleet: FakeFleet, data: bytes, ref: dict[str, Any]) -> None:
    fleet.server.routes[("GET", ref["url"])] = lambda h, b: h.serve_bytes(data, etag=f'"{ref["sha256"]}"')


def _wanted(ref: dict[str, Any], version_id: int = 8, number: int = 8) -> dict[str, Any]:
    return {
        "shadow_id": 3,
        "version_id": version_id,
        "label": "digits:v8",
        "family": "digits",
        "number": number,
        "artifact": ref,
        "spec": SPEC.to_dict(),
        "sample_rate": 0.5,
        "max_cpu_percent": 20.0,
        "budget_ms": None,
        "tolerance": 0.0,
    }


def _downloads(fleet: FakeFleet) -> int:
    return sum(1 for method, path, _, _ in fleet.server.requests if method == "GET" and "artifacts" in path)


def test_the_agent_loads_a_verified_shadow_without_installing_it(agent: Any) -> None:
    board, fleet = agent
    data = linear_onnx(seed=1)
    ref = SIGNER.ref(data, version_id=8)
    _serve(fleet, data, ref)
    model = board.sync_shadow(_wanted(ref))
    assert model is not None and model.version_id == 8 and model.sample_rate == 0.5
    assert board.shadow.model is model and _downloads(fleet) == 1
    assert (board.state.root / "shadow" / ref["sha256"]).exists()
    assert board.state.current() is None and board.state.installed_versions() == []
    assert board.local.status()["shadow_version_id"] == 8
    # The same candidate again: the policy changes, nothing is fetched.
    again = _wanted(ref)
    again["sample_rate"] = 0.1
    assert board.sync_shadow(again) is model and model.sample_rate == 0.1 and _downloads(fleet) == 1
    assert board.sync_shadow(None) is None and board.shadow.model is None


@pytest.mark.parametrize(
    "signed",
    [
        {"version_id": 9, "number": 8},  # a statement for another version
        {"version_id": 8, "kind": "weights"},  # another kind
        {"version_id": 8, "family": "other"},  # another family
        {"version_id": 8, "expires_at": 1},  # expired
    ],
)
def test_a_shadow_artifact_with_a_wrong_statement_is_refused(agent: Any, signed: dict[str, Any]) -> None:
    board, fleet = agent
    data = linear_onnx(seed=1)
    ref = SIGNER.ref(data, **signed)
    _serve(fleet, data, ref)
    assert board.sync_shadow(_wanted(ref)) is None
    assert board.shadow.model is None and _downloads(fleet) == 0
    # Remembered: the same refused artifact is not looked at again.
    assert board.sync_shadow(_wanted(ref)) is None and _downloads(fleet) == 0


def test_a_shadow_artifact_signed_by_another_key_is_refused(agent: Any) -> None:
    board, fleet = agent
    data = linear_onnx(seed=1)
    ref = Signer(seed=b"\x07" * 32).ref(data, version_id=8)
    _serve(fleet, data, ref)
    assert board.sync_shadow(_wanted(ref)) is None and _downloads(fleet) == 0
