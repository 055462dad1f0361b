from __future__ import annotations

import numpy as np
import pytest

from devices_agent.codecs import decode_tensors
from devices_agent.local_train import evaluate_numpy
from models_registry.ml.export import export_onnx, run_onnx
from models_registry.ml.optimise import (
    compact_onnx,
    convert_fp16,
    distil,
    prune_magnitude,
    quantize_dynamic_int8,
    quantize_static_int8,
)

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
Weights = dict[str, np.ndarray]


def _accuracy(onnx_bytes: bytes, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(run_onnx(onnx_bytes, x).argmax(axis=1) == y))


@pytest.fixture(scope="module")
def mlp_onnx(trained_mlp: Weights, digits: Digits) -> bytes:
    return export_onnx(arch="mlp", weights=trained_mlp, sample_inputs=digits[2][:16]).onnx_bytes


@pytest.fixture(scope="module")
def cnn_onnx(trained_cnn: Weights, digits: Digits) -> bytes:
    return export_onnx(arch="cnn", weights=trained_cnn, sample_inputs=digits[2][:16]).onnx_bytes


def test_compaction_keeps_the_computation(mlp_onnx: bytes, digits: Digits) -> None:
    x = digits[2]
    compact = compact_onnx(mlp_onnx)
    assert len(compact) < len(mlp_onnx)
    assert np.array_equal(run_onnx(compact, x), run_onnx(mlp_onnx, x))


def test_int8_dynamic_mlp_is_under_035x_and_keeps_accuracy(mlp_onnx: bytes, digits: Digits) -> None:
    _, _, x_test, y_test = digits
    variant = quantize_dynamic_int8(mlp_onnx)
    assert variant.details["integer_ops"] == ["MatMulInteger"]
    assert variant.size_bytes < 0.35 * len(mlp_onnx)
    assert _accuracy(variant.onnx_bytes, x_test, y_test) >= _accuracy(mlp_onnx, x_test, y_test) - 0.01


def test_int8_dynamic_cnn_quantises_the_head_and_records_the_skipped_conv(
    cnn_onnx: bytes, digits: Digits
) -> None:
    _, _, x_test, y_test = digits
    variant = quantize_dynamic_int8(cnn_onnx)
    assert "Conv" in variant.details["skipped"]
    assert variant.size_bytes < len(cnn_onnx)
    assert _accuracy(variant.onnx_bytes, x_test, y_test) >= _accuracy(cnn_onnx, x_test, y_test) - 0.01


def test_fp16_halves_the_weights_and_keeps_fp32_io(mlp_onnx: bytes, digits: Digits) -> None:
    import onnx
    from onnx import TensorProto

    x = digits[2]
    variant = convert_fp16(mlp_onnx)
    model = onnx.load_from_string(variant.onnx_bytes)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert all(init.data_type == TensorProto.FLOAT16 for init in model.graph.initializer)
    assert variant.size_bytes < 0.55 * len(mlp_onnx)
    assert np.max(np.abs(run_onnx(variant.onnx_bytes, x) - run_onnx(mlp_onnx, x))) < 0.05


def test_int8_static_measures_each_operator_choice(cnn_onnx: bytes, digits: Digits) -> None:
    x_train, y_train, x_test, y_test = digits
    variant = quantize_static_int8(cnn_onnx, x_train[:128], calibration_y=y_train[:128], latency_repeats=5)
    candidates = variant.details["candidates"]
    assert candidates[0]["op_types"] == []  # the fp32 reference, timed in the same run
    tried = [c["op_types"] for c in candidates[1:]]
    assert tried == [["Conv"], ["Gemm"], ["Conv", "Gemm"]]
    chosen = [c for c in candidates if c.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["op_types"] == variant.details["op_types"]
    assert all(c["p50_batch1_us"] > 0 and c["p50_batch64_us"] > 0 for c in candidates)
    assert _accuracy(variant.onnx_bytes, x_test, y_test) >= _accuracy(cnn_onnx, x_test, y_test) - 0.02


def test_int8_static_with_fixed_operators(mlp_onnx: bytes, digits: Digits) -> None:
    import onnx

    variant = quantize_static_int8(mlp_onnx, digits[0][:64], op_types=["Gemm"], latency_repeats=3)
    ops = {n.op_type for n in onnx.load_from_string(variant.onnx_bytes).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert variant.size_bytes < 0.5 * len(mlp_onnx)


def test_unstructured_pruning_sparsifies_and_compresses(trained_mlp: Weights, digits: Digits) -> None:
    x_train, y_train, x_test, y_test = digits
    result = prune_magnitude(
        arch="mlp",
        weights=trained_mlp,
        x=x_train,
        y=y_train,
        amount=0.6,
        structured=False,
        finetune_epochs=1,
        lr=1e-3,
        seed=0,
    )
    assert result.sparsity == pytest.approx(0.6, abs=0.01)
    assert result.widths == (64, 64)
    # Dense zeros cost the same bytes; int8 and compression are where the size goes down.
    assert result.int8.size_bytes < 0.35 * result.fp32.size_bytes
    assert result.fp32.compressed_size_bytes < 0.6 * result.fp32.size_bytes
    assert result.int8.compressed_size_bytes < result.int8.size_bytes * 0.8
    _, base = evaluate_numpy(arch="mlp", weights=trained_mlp, x=x_test, y=y_test)
    assert _accuracy(result.int8.onnx_bytes, x_test, y_test) >= base - 0.03
    weights, metadata = decode_tensors(result.fp32.weights_safetensors or b"")
    assert metadata["arch"] == "mlp" and np.mean(weights["fc1.weight"] == 0) >= 0.59


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_structured_pruning_removes_units(arch: str, digits: Digits, request: pytest.FixtureRequest) -> None:
    weights = request.getfixturevalue(f"trained_{arch}")
    x_train, y_train, x_test, y_test = digits
    result = prune_magnitude(
        arch=arch,
        weights=weights,
        x=x_train,
        y=y_train,
        amount=0.5,
        structured=True,
        finetune_epochs=2,
        lr=1e-3,
        seed=0,
    )
    full = (64, 64) if arch == "mlp" else (8, 16)
    assert result.widths == tuple(w // 2 for w in full)
    full_size = len(export_onnx(arch=arch, weights=weights, sample_inputs=x_test[:4]).onnx_bytes)
    assert result.fp32.size_bytes < 0.6 * full_size
    # The compacted graph computes what the masked torch model computes.
    _, torch_acc = evaluate_numpy(arch=arch, weights=result.weights, x=x_test, y=y_test)
    assert _accuracy(result.fp32.onnx_bytes, x_test, y_test) == pytest.approx(torch_acc)
    assert torch_acc > 0.85


def test_distillation_trains_a_smaller_student(trained_mlp: Weights, digits: Digits) -> None:
    x_train, y_train, x_test, y_test = digits
    variant = distil(
        teacher_arch="mlp",
        teacher_weights=trained_mlp,
        student_arch="mlp_small",
        x=x_train,
        y=y_train,
        epochs=4,
        temperature=4.0,
        alpha=0.7,
        lr=5e-3,
        seed=0,
    )
    assert variant.arch == "mlp_small"
    assert variant.details["student_params"] < 0.3 * variant.details["teacher_params"]
    assert _accuracy(variant.onnx_bytes, x_test, y_test) > 0.85
    with pytest.raises(ValueError, match="temperature"):
        distil(
            teacher_arch="mlp",
            teacher_weights=trained_mlp,
            student_arch="mlp_small",
            x=x_train,
            y=y_train,
            epochs=1,
            temperature=0.0,
            alpha=0.5,
            lr=1e-3,
            seed=0,
        )
