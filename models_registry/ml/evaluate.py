"""Evaluation reports for ONNX models: quality by task, calibration curves, latency, size.

:func:`evaluate_onnx` is what the registry stores as a version's evaluation report, so
everything it returns is plain JSON (floats, ints, lists, ``None`` for undefined values).
Latency is measured in ONNX Runtime on this CPU with one intra-op thread by default
(boards are small and the server shares its cores), after a warm-up, with
``time.perf_counter_ns`` around each ``run`` call.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "EvaluationInputError",
    "evaluate_onnx",
    "evaluate_regression_onnx",
    "measure_latency",
    "model_inputs",
    "ort_session",
    "run_onnx",
]

# ROC curves are stored for charts; 50 points per class draw a smooth curve.
MAX_ROC_POINTS = 50


class EvaluationInputError(ValueError):
    """The evaluation data does not fit the model (shape, labels, classes)."""


def ort_session(onnx_bytes: bytes, *, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and sequential execution.

    Raises :class:`EvaluationInputError` when the bytes are not a model ORT can load.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise EvaluationInputError(f"ONNX Runtime cannot load the model: {exc}") from exc


def model_inputs(x: npt.ArrayLike) -> npt.NDArray[Any]:
    """``x`` as a model input: floats as float32, integer inputs (token ids, pixels) as they are."""
    array = np.asarray(x)
    if np.issubdtype(array.dtype, np.integer):
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array, dtype=np.float32)


def run_onnx(
    onnx_bytes: bytes, x: npt.ArrayLike, *, threads: int = 1, session: Any = None
) -> npt.NDArray[Any]:
    """Run a model in ONNX Runtime (CPU) on a batch and return its first output as float32."""
    sess = session if session is not None else ort_session(onnx_bytes, threads=threads)
    out = sess.run(None, {sess.get_inputs()[0].name: model_inputs(x)})[0]
    return np.asarray(out, dtype=np.float32)


def _batch_of(x: npt.NDArray[Any], batch: int) -> npt.NDArray[Any]:
    # Repeat the data when it holds fewer rows than the batch, so any data set can time
    # any batch size.
    reps = -(-batch // len(x))
    return np.ascontiguousarray(np.concatenate([x] * reps)[:batch])


def measure_latency(
    *,
    onnx_bytes: bytes,
    x: npt.ArrayLike,
    batch: int,
    repeats: int = 200,
    warmup: int = 20,
    threads: int = 1,
    session: Any = None,
) -> dict[str, float]:
    """Time ``repeats`` ONNX Runtime runs of one ``batch``-row input; p50/p95/mean in µs.

    Rows come from ``x`` (repeated if it is shorter than ``batch``). The first ``warmup``
    runs are not timed: they pay for lazy allocations and kernel selection.
    """
    if repeats < 1 or batch < 1:
        raise ValueError("repeats and batch must be positive")
    xs = model_inputs(x)
    sess = session if session is not None else ort_session(onnx_bytes, threads=threads)
    name = sess.get_inputs()[0].name
    feed = {name: _batch_of(xs, batch)}
    for _ in range(warmup):
        sess.run(None, feed)
    samples = np.empty(repeats, dtype=np.float64)
    for i in range(repeats):
        start = time.perf_counter_ns()
        sess.run(None, feed)
        samples[i] = (time.perf_counter_ns() - start) / 1000.0
    return {
        "p50_us": float(np.percentile(samples, 50)),
        "p95_us": float(np.percentile(samples, 95)),
        "mean_us": float(samples.mean()),
        "batch": batch,
        "repeats": repeats,
    }


def _input_features(sess: Any) -> list[int | None]:
    shape = sess.get_inputs()[0].shape
    return [d if isinstance(d, int) and d > 0 else None for d in shape[1:]]


def _downsample(
    fpr: npt.NDArray[np.float64], tpr: npt.NDArray[np.float64]
) -> tuple[list[float], list[float]]:
    if len(fpr) > MAX_ROC_POINTS:
        # Evenly spaced indices keep both end points (0,0) and (1,1).
        index = np.unique(np.linspace(0, len(fpr) - 1, MAX_ROC_POINTS).round().astype(int))
        fpr, tpr = fpr[index], tpr[index]
    return [float(v) for v in fpr], [float(v) for v in tpr]


def _parameter_count(onnx_bytes: bytes) -> int:
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    return int(sum(int(np.prod(init.dims, dtype=np.int64)) for init in model.graph.initializer))


def _cost(onnx_bytes: bytes, sess: Any, xs: npt.NDArray[Any], latency_repeats: int) -> dict[str, Any]:
    latency = {
        f"batch_{batch}": measure_latency(
            onnx_bytes=onnx_bytes, x=xs, batch=batch, repeats=latency_repeats, session=sess
        )
        for batch in (1, 64)
    }
    return {
        "latency_us": latency,
        "size_bytes": len(onnx_bytes),
        "compressed_size_bytes": len(zlib.compress(onnx_bytes, 9)),
        "parameter_count": _parameter_count(onnx_bytes),
    }


def evaluate_regression_onnx(
    *,
    onnx_bytes: bytes,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    output_size: int,
    latency_repeats: int = 200,
    threads: int = 1,
) -> dict[str, Any]:
    """Evaluate an ONNX regressor on targets; return a JSON-ready report.

    Keys: ``num_examples``, ``output_size``, ``mae``, ``rmse``, ``loss`` (mean squared
    error), ``mae_per_output``, ``r2`` (per output, ``None`` for a constant target), and
    the latency and size keys of :func:`evaluate_onnx`. Raises
    :class:`EvaluationInputError` when shapes do not fit.
    """
    xs = np.asarray(x)
    ys = np.asarray(y, dtype=np.float64).reshape(len(xs), -1) if len(np.asarray(y)) else np.zeros((0, 1))
    if len(xs) == 0:
        raise EvaluationInputError("no examples to evaluate")
    if ys.shape != (len(xs), output_size):
        raise EvaluationInputError(f"targets must have shape ({len(xs)}, {output_size}); got {ys.shape}")
    if not np.all(np.isfinite(ys)) or not np.all(np.isfinite(xs)):
        raise EvaluationInputError("x and y must be finite numbers")
    sess = ort_session(onnx_bytes, threads=threads)
    xs = model_inputs(xs)
    out = np.asarray(sess.run(None, {sess.get_inputs()[0].name: xs})[0], dtype=np.float64).reshape(
        len(xs), -1
    )
    if out.shape != ys.shape:
        raise EvaluationInputError(f"model outputs shape {out.shape}, expected {ys.shape}")
    error = out - ys
    variance = ys.var(axis=0)
    r2 = [None if v == 0 else float(1.0 - (error[:, i] ** 2).mean() / v) for i, v in enumerate(variance)]
    return {
        "num_examples": len(xs),
        "output_size": output_size,
        "mae": float(np.abs(error).mean()),
        "rmse": float(np.sqrt((error**2).mean())),
        "loss": float((error**2).mean()),
        "mae_per_output": [float(v) for v in np.abs(error).mean(axis=0)],
        "r2": r2,
        **_cost(onnx_bytes, sess, xs, latency_repeats),
    }


def evaluate_onnx(
    *,
    onnx_bytes: bytes,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    num_classes: int,
    latency_repeats: int = 200,
    threads: int = 1,
) -> dict[str, Any]:
    """Evaluate an ONNX classifier on labelled data; return a JSON-ready report.

    Keys: ``num_examples``, ``accuracy``, ``loss`` (mean cross-entropy from the logits),
    ``precision`` and ``recall`` (per class), ``confusion_matrix`` (rows true, columns
    predicted), ``roc`` (per class ``{"fpr", "tpr"}``, one-vs-rest, at most 50 points;
    ``None`` for a class with no positive or no negative example), ``auc`` (per class,
    ``None`` where undefined), ``macro_auc`` (mean over defined classes), ``latency_us``
    (``batch_1`` and ``batch_64`` with p50/p95/mean), ``size_bytes``,
    ``compressed_size_bytes`` (zlib level 9) and ``parameter_count`` (scalars in the
    stored initializers, including quantisation scales).

    Raises :class:`EvaluationInputError` when ``x`` does not have the model's feature
    shape, labels do not match ``x`` or lie outside ``[0, num_classes)``, or the model's
    output is not ``(N, num_classes)``.
    """
    from sklearn.metrics import (
        confusion_matrix,
        precision_recall_fscore_support,
        roc_auc_score,
        roc_curve,
    )

    if num_classes < 2:
        raise EvaluationInputError("num_classes must be at least 2")
    xs = np.asarray(x)
    ys = np.asarray(y)
    sess = ort_session(onnx_bytes, threads=threads)
    features = _input_features(sess)
    if xs.ndim != 1 + len(features) or any(
        want is not None and got != want for got, want in zip(xs.shape[1:], features, strict=True)
    ):
        expected = ", ".join("?" if f is None else str(f) for f in features)
        raise EvaluationInputError(f"x must have shape (N, {expected}); got {xs.shape}")
    if len(xs) == 0:
        raise EvaluationInputError("no examples to evaluate")
    if ys.shape != (len(xs),):
        raise EvaluationInputError(f"y must have shape ({len(xs)},) to match x; got {ys.shape}")
    if not np.issubdtype(ys.dtype, np.integer):
        raise EvaluationInputError(f"labels must be integers; got dtype {ys.dtype}")
    if ys.min() < 0 or ys.max() >= num_classes:
        raise EvaluationInputError(
            f"labels must lie in [0, {num_classes}); got {int(ys.min())}..{int(ys.max())}"
        )
    if not np.issubdtype(xs.dtype, np.number) or not np.all(np.isfinite(xs)):
        raise EvaluationInputError("x must be finite numbers")
    xs = model_inputs(xs)
    ys = ys.astype(np.int64)

    logits = np.asarray(sess.run(None, {sess.get_inputs()[0].name: xs})[0], dtype=np.float64)
    if logits.shape != (len(xs), num_classes):
        raise EvaluationInputError(f"model outputs shape {logits.shape}, expected ({len(xs)}, {num_classes})")
    # log-softmax with the max subtracted: exp never overflows, and log(sum) stays exact.
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    probs = np.exp(log_probs)
    predicted = logits.argmax(axis=1)
    labels = list(range(num_classes))
    precision, recall, _, _ = precision_recall_fscore_support(ys, predicted, labels=labels, zero_division=0)
    matrix = confusion_matrix(ys, predicted, labels=labels)

    roc: list[dict[str, list[float]] | None] = []
    auc: list[float | None] = []
    for cls in labels:
        positives = ys == cls
        if positives.all() or not positives.any():
            roc.append(None)
            auc.append(None)
            continue
        fpr, tpr, _ = roc_curve(positives, probs[:, cls])
        fpr_list, tpr_list = _downsample(fpr, tpr)
        roc.append({"fpr": fpr_list, "tpr": tpr_list})
        auc.append(float(roc_auc_score(positives, probs[:, cls])))
    defined = [a for a in auc if a is not None]

    return {
        "num_examples": len(xs),
        "num_classes": num_classes,
        "accuracy": float(np.mean(predicted == ys)),
        "loss": float(-np.mean(log_probs[np.arange(len(ys)), ys])),
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "confusion_matrix": [[int(v) for v in row] for row in matrix],
        "roc": roc,
        "auc": auc,
        "macro_auc": float(np.mean(defined)) if defined else None,
        **_cost(onnx_bytes, sess, xs, latency_repeats),
    }
