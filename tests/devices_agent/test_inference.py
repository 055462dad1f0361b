"""The health check and sessions over real ONNX Runtime."""

from __future__ import annotations

import numpy as np

from devices_agent.inference import health_check, load_session, to_probabilities
from tests.devices_agent.agent_helpers import linear_onnx


def test_probabilities_from_logits_or_probabilities() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0]], dtype=np.float32)
    probs = to_probabilities(logits)
    assert np.isfinite(probs).all() and abs(float(probs.sum()) - 1.0) < 1e-6
    already = np.array([[0.2, 0.8]], dtype=np.float32)
    assert np.allclose(to_probabilities(already), already)


def test_health_check_passes_a_good_model_and_explains_failures() -> None:
    ok = health_check(model=linear_onnx(), num_classes=10, latency_budget_ms=1000.0, runs=5)
    assert ok.ok and ok.p95_ms is not None and ok.runs == 5
    wrong = health_check(model=linear_onnx(classes=3), num_classes=10, runs=5)
    assert not wrong.ok and "output shape (1, 3)" in wrong.reason
    slow = health_check(model=linear_onnx(), latency_budget_ms=0.0001, runs=5)
    assert not slow.ok and "exceeds the budget" in slow.reason
    broken = health_check(model=b"not an onnx model", runs=5)
    assert not broken.ok and "does not load" in broken.reason
    mismatched = health_check(model=linear_onnx(features=64), input_shape=[32], runs=5)
    assert not mismatched.ok and "smoke inference failed" in mismatched.reason


def test_initializers_replace_the_graphs_weights_by_name() -> None:
    x = np.ones((1, 64), dtype=np.float32)
    model = linear_onnx(seed=0)
    base = load_session(model).run(None, {"input": x})[0]
    zero_bias = load_session(model, initializers={"b": np.zeros(10, np.float32)}).run(None, {"input": x})[0]
    assert not np.allclose(base, zero_bias)
    w = np.zeros((64, 10), np.float32)
    flat = load_session(model, initializers={"w": w, "b": np.arange(10, dtype=np.float32)})
    assert np.allclose(flat.run(None, {"input": x})[0], np.arange(10))
