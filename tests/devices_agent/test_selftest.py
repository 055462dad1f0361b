"""``flotilla-agent selftest`` on this machine, which has every runtime the agent can use."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from devices_agent.selftest import selftest, tiny_onnx


def test_the_hand_built_graph_runs_in_onnx_runtime() -> None:
    import onnxruntime as ort

    weights = np.arange(6, dtype=np.float32).reshape(3, 2)
    session = ort.InferenceSession(tiny_onnx(weights), providers=["CPUExecutionProvider"])
    x = np.ones((4, 3), dtype=np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weights, atol=1e-6)


def test_the_report_names_versions_and_proves_inference_and_training() -> None:
    pytest.importorskip("torch")
    report = selftest(train=True)
    assert report["ok"], report
    assert report["numpy"] and report["onnxruntime"] and report["torch"]
    assert report["inference"]["ok"] and report["inference"]["latency_ms"] >= 0
    assert report["training"] == {"ok": True, "backends": {"torch": {"ok": True, "steps": 1.0}}}
    assert "training" not in selftest()


def test_the_command_prints_the_report_and_exits_with_its_verdict() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "devices_agent", "selftest"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["ok"] is True
