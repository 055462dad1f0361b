from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from models_registry.ml.evaluate import EvaluationInputError, evaluate_onnx, measure_latency

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _linear_model(weight: np.ndarray) -> bytes:
    """An ONNX graph logits = input @ weight, built by hand."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    features, classes = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"])],
        "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def test_perfect_classifier_report() -> None:
    # One-hot inputs through a scaled identity: the true class always wins by far.
    onnx_bytes = _linear_model(np.eye(3) * 10.0)
    y = np.array([0, 1, 2, 2, 1, 0, 0])
    x = np.eye(3, dtype=np.float32)[y]
    report = evaluate_onnx(onnx_bytes=onnx_bytes, x=x, y=y, num_classes=3, latency_repeats=5)
    json.dumps(report)  # plain JSON all the way down
    assert report["accuracy"] == 1.0
    assert report["precision"] == [1.0, 1.0, 1.0] and report["recall"] == [1.0, 1.0, 1.0]
    assert report["confusion_matrix"] == [[3, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert report["auc"] == [1.0, 1.0, 1.0] and report["macro_auc"] == 1.0
    # Cross-entropy of logits (10, 0, 0): log(1 + 2 e^-10).
    assert report["loss"] == pytest.approx(np.log1p(2 * np.exp(-10.0)), rel=1e-5)
    assert report["size_bytes"] == len(onnx_bytes)
    assert report["parameter_count"] == 9
    for batch in ("batch_1", "batch_64"):
        latency = report["latency_us"][batch]
        assert 0 < latency["p50_us"] <= latency["p95_us"]
    roc = report["roc"][0]
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0


def test_mistakes_show_in_the_confusion_matrix_and_undefined_auc_is_none() -> None:
    # Class 1 is always predicted as class 0; class 2 never appears in the labels.
    weight = np.array([[5.0, 0.0, 0.0], [5.0, 1.0, 0.0], [0.0, 0.0, 5.0]])
    onnx_bytes = _linear_model(weight)
    y = np.array([0, 0, 1, 1])
    x = np.eye(3, dtype=np.float32)[y]
    report = evaluate_onnx(onnx_bytes=onnx_bytes, x=x, y=y, num_classes=3, latency_repeats=3)
    assert report["accuracy"] == 0.5
    assert report["confusion_matrix"] == [[2, 0, 0], [2, 0, 0], [0, 0, 0]]
    assert report["precision"][0] == 0.5 and report["recall"][1] == 0.0
    assert report["auc"][2] is None and report["roc"][2] is None
    assert report["macro_auc"] == pytest.approx(np.mean([a for a in report["auc"] if a is not None]))


def test_roc_curves_are_downsampled(mlp: Any, digits: Digits) -> None:
    _, _, x_test, y_test = digits
    report = evaluate_onnx(onnx_bytes=mlp.onnx, x=x_test, y=y_test, num_classes=10, latency_repeats=5)
    assert report["accuracy"] > 0.85 and report["macro_auc"] > 0.97
    assert all(len(c["fpr"]) <= 50 and len(c["fpr"]) == len(c["tpr"]) for c in report["roc"])
    assert report["parameter_count"] == 8970


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.zeros((4, 5), np.float32), np.zeros(4, np.int64), "shape"),
        (np.zeros((4,), np.float32), np.zeros(4, np.int64), "shape"),
        (np.zeros((4, 3), np.float32), np.zeros(3, np.int64), "match x"),
        (np.zeros((4, 3), np.float32), np.array([0, 1, 2, 3]), "labels must lie"),
        (np.zeros((4, 3), np.float32), np.array([0.0, 1.0, 1.0, 0.0]), "integers"),
        (np.full((4, 3), np.nan, np.float32), np.zeros(4, np.int64), "finite"),
    ],
)
def test_bad_evaluation_data_is_rejected(x: np.ndarray, y: np.ndarray, message: str) -> None:
    with pytest.raises(EvaluationInputError, match=message):
        evaluate_onnx(onnx_bytes=_linear_model(np.eye(3)), x=x, y=y, num_classes=3)


def test_output_width_must_match_num_classes() -> None:
    x = np.eye(3, dtype=np.float32)
    with pytest.raises(EvaluationInputError, match="outputs shape"):
        evaluate_onnx(onnx_bytes=_linear_model(np.eye(3)), x=x, y=np.array([0, 1, 2]), num_classes=4)


def test_unloadable_model_is_an_input_error() -> None:
    with pytest.raises(EvaluationInputError, match="cannot load"):
        evaluate_onnx(onnx_bytes=b"not onnx", x=np.zeros((1, 3)), y=np.zeros(1, np.int64), num_classes=3)


def test_latency_repeats_short_data_to_fill_the_batch() -> None:
    timing = measure_latency(onnx_bytes=_linear_model(np.eye(3)), x=np.eye(3), batch=64, repeats=3, warmup=1)
    assert timing["batch"] == 64 and timing["repeats"] == 3 and timing["p50_us"] > 0


def test_integer_inputs_are_fed_as_integers() -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # logits = one_hot-ish: Cast(uint8 -> float) then MatMul.
    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input"], ["f"], to=TensorProto.FLOAT),
            helper.make_node("MatMul", ["f", "w"], ["logits"]),
        ],
        "pixels",
        [helper.make_tensor_value_info("input", TensorProto.UINT8, ["batch", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])],
        initializer=[numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    x = np.array([[200, 1], [0, 9]], dtype=np.uint8)
    report = evaluate_onnx(
        onnx_bytes=model.SerializeToString(), x=x, y=np.array([0, 1]), num_classes=2, latency_repeats=2
    )
    assert report["accuracy"] == 1.0
