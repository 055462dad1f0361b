from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from devices_agent.codecs import decode_tensors
from devices_agent.family import FamilySpec
from models_registry.ml.evaluate import run_onnx
from models_registry.ml.optimise import (
    compact_onnx,
    convert_fp16,
    distil,
    metric_drop,
    prune_unstructured,
    quantize_dynamic_int8,
    quantize_static_int8,
)
from tests.models_registry.conftest import regression_data

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
DIGITS = FamilySpec(task="classification", input_shape=(64,), num_classes=10)


def _accuracy(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(run_onnx(onnx_bytes, x).argmax(axis=1) == y))


def _state(bundle: Any) -> dict[str, np.ndarray]:
    tensors, _ = decode_tensors(bundle.weights)
    return {k: np.asarray(v) for k, v in tensors.items()}


def test_compaction_keeps_the_computation(mlp: Any, digits: Digits) -> None:
    x = digits[2]
    compact = compact_onnx(mlp.onnx)
    assert len(compact) < len(mlp.onnx)
    assert np.array_equal(run_onnx(compact, x), run_onnx(mlp.onnx, x))


def test_int8_dynamic_mlp_is_under_035x_and_keeps_accuracy(mlp: Any, digits: Digits) -> None:
    _, _, x_test, y_test = digits
    variant = quantize_dynamic_int8(mlp.onnx)
    assert variant.details["integer_ops"] == ["MatMulInteger"]
    assert variant.size_bytes < 0.35 * len(mlp.onnx)
    assert _accuracy(variant.onnx_bytes, x_test, y_test) >= _accuracy(mlp.onnx, x_test, y_test) - 0.01
    assert variant.program is None and variant.weights_safetensors is None


def test_int8_dynamic_cnn_quantises_the_head_and_records_the_skipped_conv(cnn: Any, digits: Digits) -> None:
    _, _, x_test, y_test = digits
    variant = quantize_dynamic_int8(cnn.onnx)
    assert "Conv" in variant.details["skipped"]
    assert variant.size_bytes < len(cnn.onnx)
    assert _accuracy(variant.onnx_bytes, x_test, y_test) >= _accuracy(cnn.onnx, x_test, y_test) - 0.01


def test_fp16_halves_the_weights_and_keeps_fp32_io(mlp: Any, digits: Digits) -> None:
    import onnx
    from onnx import TensorProto

    x = digits[2]
    variant = convert_fp16(mlp.onnx)
    model = onnx.load_from_string(variant.onnx_bytes)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert all(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer)
    assert variant.size_bytes < 0.55 * len(mlp.onnx)
    assert np.max(np.abs(run_onnx(variant.onnx_bytes, x) - run_onnx(mlp.onnx, x))) < 0.05


def test_int8_static_measures_each_operator_choice(cnn: Any, digits: Digits) -> None:
    x_train, y_train, x_test, y_test = digits
    variant = quantize_static_int8(
        cnn.onnx, x_train[:128], calibration_y=y_train[:128], spec=DIGITS, latency_repeats=5
    )
    candidates = variant.details["candidates"]
    assert candidates[0]["op_types"] == []  # the fp32 reference, timed in the same run
    tried = [c["op_types"] for c in candidates[1:]]
    assert tried == [["Conv"], ["Gemm"], ["Conv", "Gemm"]]
    chosen = [c for c in candidates if c.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["op_types"] == variant.details["op_types"]
    assert all(c["p50_batch1_us"] > 0 and c["p50_batch64_us"] > 0 for c in candidates)
    assert variant.details["metric"] == "accuracy"
    assert _accuracy(variant.onnx_bytes, x_test, y_test) >= _accuracy(cnn.onnx, x_test, y_test) - 0.02


def test_int8_static_with_fixed_operators(mlp: Any, digits: Digits) -> None:
    import onnx

    variant = quantize_static_int8(mlp.onnx, digits[0][:64], op_types=["Gemm"], latency_repeats=3)
    ops = {n.op_type for n in onnx.load_from_string(variant.onnx_bytes).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert variant.size_bytes < 0.5 * len(mlp.onnx)


def test_int8_static_judges_a_regressor_on_mae(regression_bundle: Any) -> None:
    spec = FamilySpec(task="regression", input_shape=(4,), output_size=2)
    x, y = regression_data(200, seed=3)
    variant = quantize_static_int8(
        regression_bundle.onnx, x, calibration_y=y, spec=spec, max_metric_drop=0.05, latency_repeats=3
    )
    reference, *rest = variant.details["candidates"]
    assert variant.details["metric"] == "mae" and "mae" in reference
    assert all("mae" in c and "metric_ok" in c for c in rest if "error" not in c)


def test_metric_drop_follows_the_direction_of_the_metric() -> None:
    assert metric_drop(0.9, 0.85, higher_is_better=True) == pytest.approx(0.05)
    assert metric_drop(0.2, 0.25, higher_is_better=False) == pytest.approx(0.05)
    assert metric_drop(0.2, 0.1, higher_is_better=False) < 0


def test_unstructured_pruning_trains_the_program_and_keeps_its_graph_names(mlp: Any, digits: Digits) -> None:
    import onnx
    from onnx import numpy_helper

    x_train, y_train, x_test, y_test = digits
    variant = prune_unstructured(
        program=mlp.program,
        state=_state(mlp),
        onnx_bytes=mlp.onnx,
        spec=DIGITS,
        x=x_train[:300],
        y=y_train[:300],
        amount=0.6,
        finetune_epochs=2,
        lr=1e-3,
        seed=0,
    )
    assert variant.details["sparsity"] == pytest.approx(0.6, abs=0.01)
    assert variant.details["pruned"] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert variant.program == mlp.program
    weights, metadata = decode_tensors(variant.weights_safetensors or b"")
    assert metadata["variant"] == "pruned_unstructured"
    assert np.mean(weights["fc1.weight"] == 0) == pytest.approx(0.6, abs=0.01)
    graph = {
        i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(variant.onnx_bytes).graph.initializer
    }
    assert np.array_equal(graph["fc1.weight"], weights["fc1.weight"])
    # Dense zeros cost the same bytes; compression is where the size goes down.
    assert variant.compressed_size_bytes < 0.8 * variant.size_bytes
    assert _accuracy(variant.onnx_bytes, x_test, y_test) >= _accuracy(mlp.onnx, x_test, y_test) - 0.05
    quantised = prune_unstructured(
        program=mlp.program,
        state=_state(mlp),
        onnx_bytes=mlp.onnx,
        spec=DIGITS,
        x=x_train[:300],
        y=y_train[:300],
        amount=0.6,
        finetune_epochs=0,
        lr=1e-3,
        seed=0,
        quantise=True,
    )
    assert quantised.name == "pruned_unstructured_int8" and quantised.program is None
    assert quantised.size_bytes < 0.35 * variant.size_bytes
    with pytest.raises(ValueError, match="amount"):
        prune_unstructured(
            program=mlp.program,
            state=_state(mlp),
            onnx_bytes=mlp.onnx,
            spec=DIGITS,
            x=x_train[:10],
            y=y_train[:10],
            amount=1.0,
            finetune_epochs=0,
            lr=1e-3,
            seed=0,
        )


def test_training_data_must_fit_the_family(mlp: Any, digits: Digits) -> None:
    x_train, y_train, _, _ = digits
    with pytest.raises(ValueError, match="does not fit the family"):
        prune_unstructured(
            program=mlp.program,
            state=_state(mlp),
            onnx_bytes=mlp.onnx,
            spec=DIGITS,
            x=x_train[:10, :32],
            y=y_train[:10],
            amount=0.5,
            finetune_epochs=1,
            lr=1e-3,
            seed=0,
        )


def test_distillation_trains_the_students_program(mlp: Any, small: Any, digits: Digits) -> None:
    x_train, y_train, x_test, y_test = digits
    student_state = _state(small)
    variant = distil(
        teacher_onnx=mlp.onnx,
        student_program=small.program,
        student_state=student_state,
        student_onnx=small.onnx,
        spec=DIGITS,
        x=x_train,
        y=y_train,
        epochs=4,
        temperature=4.0,
        alpha=0.7,
        lr=5e-3,
        seed=0,
    )
    assert variant.program == small.program
    assert variant.details["student_params"] < 0.5 * variant.details["teacher_params"]
    assert _accuracy(variant.onnx_bytes, x_test, y_test) > 0.85
    assert _accuracy(small.onnx, x_test, y_test) < 0.3  # the untrained student
    with pytest.raises(ValueError, match="temperature"):
        distil(
            teacher_onnx=mlp.onnx,
            student_program=small.program,
            student_state=student_state,
            student_onnx=small.onnx,
            spec=DIGITS,
            x=x_train,
            y=y_train,
            epochs=1,
            temperature=0.0,
            alpha=0.5,
            lr=1e-3,
            seed=0,
        )


def test_distillation_of_a_regressor_follows_the_teacher(regression_bundle: Any) -> None:
    spec = FamilySpec(task="regression", input_shape=(4,), output_size=2)
    x, y = regression_data(400, seed=4)
    tensors, _ = decode_tensors(regression_bundle.weights)
    start = {k: np.asarray(v) * 0.1 for k, v in tensors.items()}
    before = float(np.abs(run_onnx(regression_bundle.onnx, x) - y).mean())
    from models_registry.ml.onnx_weights import onnx_with_weights

    student_onnx = onnx_with_weights(regression_bundle.onnx, start)
    variant = distil(
        teacher_onnx=regression_bundle.onnx,
        student_program=regression_bundle.program,
        student_state=start,
        student_onnx=student_onnx,
        spec=spec,
        x=x,
        y=y,
        epochs=40,
        temperature=1.0,
        alpha=0.5,
        lr=0.01,
        seed=0,
    )
    after = float(np.abs(run_onnx(variant.onnx_bytes, x) - y).mean())
    shrunk = float(np.abs(run_onnx(student_onnx, x) - y).mean())
    assert after < shrunk and after < before + 0.2
