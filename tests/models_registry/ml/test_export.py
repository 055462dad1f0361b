from __future__ import annotations

import numpy as np
import pytest

from devices_agent.local_train import evaluate_numpy
from models_registry.ml.export import (
    ExportParityError,
    export_module,
    export_onnx,
    make_trace_divergent_module,
    run_onnx,
)

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Weights = dict[str, np.ndarray]


@pytest.mark.parametrize("fixture", ["trained_mlp", "trained_cnn"])
def test_export_matches_torch(fixture: str, digits: Digits, request: pytest.FixtureRequest) -> None:
    import onnx

    arch = fixture.removeprefix("trained_")
    weights = request.getfixturevalue(fixture)
    _, _, x_test, y_test = digits
    result = export_onnx(arch=arch, weights=weights, sample_inputs=x_test[:32])
    assert result.parity_ok and result.max_abs_diff < 1e-4
    assert result.opset == 17 and result.exporter == "torchscript"
    model = onnx.load_from_string(result.onnx_bytes)
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert model.opset_import[0].version == 17
    # The batch axis is dynamic: any batch size runs, and accuracy matches torch's.
    logits = run_onnx(result.onnx_bytes, x_test)
    assert logits.shape == (len(x_test), 10)
    _, torch_accuracy = evaluate_numpy(arch=arch, weights=weights, x=x_test, y=y_test)
    assert np.mean(logits.argmax(axis=1) == y_test) == pytest.approx(torch_accuracy)


def test_parity_failure_raises_with_the_numbers(digits: Digits) -> None:
    _, _, x_test, _ = digits
    with pytest.raises(ExportParityError) as info:
        export_module(module=make_trace_divergent_module(), sample_inputs=x_test[:8])
    assert info.value.max_abs_diff > 1e-2
    assert info.value.atol == 1e-4
    assert "max |diff|" in str(info.value)


def test_export_rejects_weights_of_another_arch(trained_mlp: Weights, digits: Digits) -> None:
    with pytest.raises(ValueError, match="weights"):
        export_onnx(arch="cnn", weights=trained_mlp, sample_inputs=digits[2][:4])


def test_export_rejects_an_empty_sample(trained_mlp: Weights) -> None:
    with pytest.raises(ValueError, match="sample_inputs"):
        export_onnx(arch="mlp", weights=trained_mlp, sample_inputs=np.zeros((0, 64)))
