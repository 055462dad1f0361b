"""The on-device drift sketch: Welford moments against numpy, reset, and a small JSON body."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from devices_agent.drift import DriftSketch


def test_moments_match_numpy_over_uneven_batches() -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(loc=3.0, scale=2.0, size=(257, 64))
    sketch = DriftSketch(num_features=64)
    for start, stop in ((0, 1), (1, 40), (40, 41), (41, 200), (200, 257)):
        sketch.update(inputs=data[start:stop], confidence=rng.uniform(size=stop - start))
    assert sketch.count == 257
    np.testing.assert_allclose(sketch.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sketch.variance(), data.var(axis=0), rtol=1e-10)


def test_confidence_histogram_bins_and_edges() -> None:
    sketch = DriftSketch(num_features=2)
    sketch.update(inputs=np.zeros((5, 2)), confidence=[0.0, 0.05, 0.1, 0.95, 1.0])
    assert sketch.histogram.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2]


def test_take_resets_and_returns_none_when_empty() -> None:
    sketch = DriftSketch(num_features=3)
    assert sketch.take() is None
    sketch.update(inputs=np.ones((4, 3)), confidence=[0.5] * 4)
    sent = sketch.take()
    assert sent is not None and sent["count"] == 4 and sent["mean"] == [1.0, 1.0, 1.0]
    assert sketch.count == 0 and sketch.histogram.sum() == 0 and sketch.take() is None


def test_json_is_small_for_digits() -> None:
    rng = np.random.default_rng(1)
    sketch = DriftSketch(num_features=64)
    sketch.update(inputs=rng.uniform(size=(1000, 64)), confidence=rng.uniform(size=1000))
    body = json.dumps(sketch.to_dict(), separators=(",", ":"))
    assert len(body) < 2048
    assert json.loads(body)["count"] == 1000


def test_agent_sends_the_sketch_every_n_heartbeats_and_retries(tmp_path: Path) -> None:
    from devices_agent.family import FamilySpec
    from devices_agent.inference import load_session
    from devices_agent.local_api import ActiveModel
    from tests.devices_agent.agent_helpers import Handler, ScriptedServer, linear_onnx
    from tests.devices_agent.test_agent import FakeFleet, make_agent

    server = ScriptedServer()
    fleet = FakeFleet(server)
    state = {"down": True}

    def drift(h: Handler, body: bytes) -> None:
        h.send_json(503 if state["down"] else 200, {"id": 1, "alert": False, "score": 0.0})

    server.routes[("POST", "/api/agent/v1/drift")] = drift
    agent = make_agent(fleet, tmp_path)
    try:
        agent.config.drift_every = 2
        agent.enroll()
        active = ActiveModel(
            version_id=7,
            spec=FamilySpec(task="classification", input_shape=(64,), num_classes=10),
            session=load_session(linear_onnx()),
        )
        agent.local.model = lambda: active
        agent.state.current_version_id = lambda: 7  # type: ignore[method-assign]
        rng = np.random.default_rng(2)
        inputs = rng.uniform(size=(5, 64)).astype(np.float32)
        for row in inputs:
            agent.local.predict(row)
        agent.heartbeat()
        assert server.posted("/api/agent/v1/drift") == []  # only every 2nd heartbeat
        agent.heartbeat()  # server down: kept for the next time
        agent.local.predict(inputs[0])  # lands in the next window, not the pending one
        state["down"] = False
        agent.heartbeat()
        agent.heartbeat()
        sent = server.posted("/api/agent/v1/drift")
        # The failed try and the retry carry the same window, unchanged.
        assert len(sent) >= 2 and all(s == sent[0] for s in sent)
        delivered = sent[-1]
        assert delivered["count"] == 5 and delivered["version_id"] == 7
        np.testing.assert_allclose(delivered["mean"], inputs.mean(axis=0), atol=1e-4)
        assert sum(delivered["confidence_hist"]) == 5
        assert agent.send_drift() is True  # the later prediction, in a window of its own
        assert server.posted("/api/agent/v1/drift")[-1]["count"] == 1
        assert agent.send_drift() is False  # nothing new
    finally:
        agent.close()
        server.close()


def test_feature_bins_count_values_over_the_reference_edges_and_survive_a_reset() -> None:
    from devices_agent.drift import bin_counts

    assert bin_counts(values=[-5.0, 0.0, 0.5, 1.0, 1.5, 9.0], edges=[0.0, 1.0]).tolist() == [1, 2, 3]
    bins = {"etag": "abc", "features": [1], "edges": [[0.0, 1.0]]}
    sketch = DriftSketch(num_features=2, feature_bins=bins)
    sketch.update(inputs=[[9.0, -1.0], [9.0, 0.5], [9.0, 2.0], [9.0, 3.0]], confidence=[0.5] * 4)
    sent = sketch.take()
    assert sent is not None and sent["feature_hist"] == [[1, 1, 2]] and sent["bins_etag"] == "abc"
    assert sketch.feature_hist[0].tolist() == [0, 0, 0]  # the counts reset, the bins stay
    sketch.update(inputs=[[0.0, 0.2]], confidence=[0.5])
    assert sketch.to_dict()["feature_hist"] == [[0, 1, 0]]
    # Bins naming a feature the sketch does not have are ignored rather than trusted.
    odd = DriftSketch(num_features=2, feature_bins={"etag": "x", "features": [7], "edges": [[0.0]]})
    assert "feature_hist" not in odd.to_dict()


def test_agent_counts_over_the_bins_the_server_answered_with(tmp_path: Path) -> None:
    from devices_agent.family import FamilySpec
    from devices_agent.inference import load_session
    from devices_agent.local_api import ActiveModel
    from tests.devices_agent.agent_helpers import Handler, ScriptedServer, linear_onnx
    from tests.devices_agent.test_agent import FakeFleet, make_agent

    server = ScriptedServer()
    fleet = FakeFleet(server)
    bins = {"version_id": 7, "etag": "bins-1", "features": [0, 3], "edges": [[0.5], [0.25, 0.75]]}

    def drift(h: Handler, body: bytes) -> None:
        answer: dict[str, object] = {"id": 1, "alert": False, "score": 0.0}
        if json.loads(body).get("bins_etag") != "bins-1":
            answer["feature_bins"] = bins
        h.send_json(200, answer)

    server.routes[("POST", "/api/agent/v1/drift")] = drift
    agent = make_agent(fleet, tmp_path)
    try:
        agent.enroll()
        active = ActiveModel(
            version_id=7,
            spec=FamilySpec(task="classification", input_shape=(64,), num_classes=10),
            session=load_session(linear_onnx()),
        )
        agent.local.model = lambda: active
        agent.state.current_version_id = lambda: 7  # type: ignore[method-assign]
        inputs = np.random.default_rng(3).uniform(size=(6, 64)).astype(np.float32)
        for row in inputs:
            agent.local.predict(row)
        assert agent.send_drift() is True
        assert "feature_hist" not in server.posted("/api/agent/v1/drift")[-1]  # no bins yet
        for row in inputs:
            agent.local.predict(row)
        assert agent.send_drift() is True
        sent = server.posted("/api/agent/v1/drift")[-1]
        assert sent["bins_etag"] == "bins-1"
        assert sent["feature_hist"][0] == [int((inputs[:, 0] < 0.5).sum()), int((inputs[:, 0] >= 0.5).sum())]
        assert sum(sent["feature_hist"][1]) == 6
    finally:
        agent.close()
        server.close()
