"""Inference metrics and the health check over real ONNX Runtime sessions."""

from __future__ import annotations

import numpy as np

from devices_agent.inference import Predictor, health_check, to_probabilities
from tests.devices_agent.agent_helpers import linear_onnx


def test_predictions_record_latency_confidence_and_feedback_accuracy() -> None:
    samples: list[tuple[str, float, int | None]] = []
    predictor = Predictor(
        model=linear_onnx(seed=0), version_id=7, record=lambda n, v, vid: samples.append((n, v, vid))
    )
    x = np.random.default_rng(1).random((5, 64), dtype=np.float32)
    expected = predictor.predict_batch(x).argmax(axis=1)
    first = predictor.predict(x[0])
    assert first.label == int(expected[0]) and 0.0 < first.confidence <= 1.0 and first.latency_ms > 0
    assert [n for n, _, _ in samples] == ["latency_ms", "confidence"]
    assert all(vid == 7 for _, _, vid in samples)
    assert predictor.feedback(first.prediction_id, first.label) is True
    assert samples[-1] == ("correct", 1.0, 7)
    assert predictor.feedback(first.prediction_id, 3) is False  # already consumed
    predictor.predict(x[1], label=(int(expected[1]) + 1) % 10)
    assert samples[-1] == ("correct", 0.0, 7)


def test_slow_board_profile_adds_latency() -> None:
    fast = Predictor(model=linear_onnx())
    slow = Predictor(model=linear_onnx(), extra_delay_ms=20.0)
    x = np.zeros(64, dtype=np.float32)
    assert slow.predict(x).latency_ms >= 20.0 > fast.predict(x).latency_ms


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
