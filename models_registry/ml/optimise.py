"""Derived model variants: int8 (dynamic and static), fp16, pruned, distilled.

Nothing here knows an architecture. Quantisation and fp16 take any ONNX graph. Pruning
and distillation take a version's *program* (``torch.export`` JSON, loaded without
pickle by :mod:`devices_agent.program`) and weights, train it in PyTorch, and write the
new weights into the version's ONNX graph by parameter name
(:func:`models_registry.ml.onnx_weights.onnx_with_weights`), so the variant keeps the
program and can be trained further on the boards. Each function returns a
:class:`Variant`: the ONNX bytes, a one-line description, the measurements behind any
choice it made and, for trained variants, the program and the new weights (safetensors).

Graphs that are not trained further (quantised, fp16) are compacted before they are
returned (:func:`compact_onnx`): doc strings, node names and long intermediate tensor
names are protobuf overhead that, for models this small, weighs as much as a third of
the int8 weights. Graphs of trained variants keep their names: boards write weights
into them by name.

Quality is the family's primary metric (:mod:`devices_agent.family`): accuracy for
classification (higher is better), mean absolute error for regression (lower is better);
a *metric drop* is how much worse a variant is on it.
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.family import FamilySpec, outputs_metrics, probabilities

__all__ = [
    "Variant",
    "compact_onnx",
    "convert_fp16",
    "distil",
    "metric_drop",
    "prune_unstructured",
    "quantize_dynamic_int8",
    "quantize_static_int8",
]

Weights = dict[str, npt.NDArray[Any]]
log = logging.getLogger(__name__)

# Operator groups the static quantiser chooses between; Gemm and MatMul are one group
# because the exporter emits either for the same linear layer.
_STATIC_GROUPS: dict[str, tuple[str, ...]] = {"conv": ("Conv",), "linear": ("Gemm", "MatMul")}


@dataclass(frozen=True)
class Variant:
    """One derived artifact of a model version."""

    name: str
    onnx_bytes: bytes
    description: str
    weights: Weights | None = None
    weights_safetensors: bytes | None = None
    # The trainable program the weights belong to (trained variants keep one).
    program: bytes | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """Size of the ONNX artifact in bytes."""
        return len(self.onnx_bytes)

    @property
    def compressed_size_bytes(self) -> int:
        """Size after zlib level 9: what a compressed download carries (zeros shrink here)."""
        return len(zlib.compress(self.onnx_bytes, 9))


# --------------------------------------------------------------------------- helpers


def _quiet_ort() -> None:
    import onnxruntime as ort

    # ORT's native logger warns about every unused initializer the quantiser leaves
    # behind; only errors are worth a line in a worker's log.
    ort.set_default_logger_severity(3)


class _DropPreprocessAdvice(logging.Filter):
    """Drops the quantiser's "consider pre-processing" advice: shape inference gains
    nothing on these small static graphs, and the advice repeats on every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextmanager
def _quiet_quantiser() -> Iterator[None]:
    root = logging.getLogger()
    advice = _DropPreprocessAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def compact_onnx(onnx_bytes: bytes) -> bytes:
    """Drop doc strings, node names and value_info, and shorten intermediate tensor names.

    The graph input and output keep their names (``input``/``logits``), so the result is
    a drop-in replacement; the computation is unchanged.
    """
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    keep = {v.name for v in graph.input} | {v.name for v in graph.output}
    mapping: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep:
            return name
        if name not in mapping:
            mapping[name] = f"t{len(mapping)}"
        return mapping[name]

    model.doc_string = ""
    model.producer_name = ""
    model.producer_version = ""
    graph.doc_string = ""
    del graph.value_info[:]
    for init in graph.initializer:
        init.name = short(init.name)
        init.doc_string = ""
    for node in graph.node:
        node.name = ""
        node.doc_string = ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _with_node_names(onnx_bytes: bytes) -> bytes:
    """Give every node a unique name: ORT's quantiser silently skips nameless nodes."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    for index, node in enumerate(model.graph.node):
        node.name = f"{node.op_type}_{index}"
    return bytes(model.SerializeToString())


def _outputs(onnx_bytes: bytes, x: npt.NDArray[Any], batch: int = 4096) -> npt.NDArray[np.float64]:
    from models_registry.ml.evaluate import ort_session, run_onnx

    session = ort_session(onnx_bytes)
    parts = [run_onnx(b"", x[i : i + batch], session=session) for i in range(0, len(x), batch)]
    return np.concatenate(parts).astype(np.float64).reshape(len(x), -1)


def metric_drop(reference: float, value: float, *, higher_is_better: bool) -> float:
    """How much worse ``value`` is than ``reference`` on a metric (negative when it is better)."""
    return reference - value if higher_is_better else value - reference


def _quality(onnx_bytes: bytes, x: npt.NDArray[Any], y: npt.NDArray[Any], spec: FamilySpec | None) -> float:
    """The primary metric of the model on ``(x, y)`` (accuracy when no family is given)."""
    outputs = _outputs(onnx_bytes, x)
    if spec is None:
        return float(np.mean(outputs.argmax(axis=1) == np.asarray(y)))
    return float(outputs_metrics(spec, outputs, y)[spec.primary_metric])


def _op_types(onnx_bytes: bytes) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load_from_string(onnx_bytes).graph.node}


def _session_ok(onnx_bytes: bytes, x: npt.NDArray[Any]) -> str | None:
    from models_registry.ml.evaluate import run_onnx

    try:
        out = run_onnx(onnx_bytes, x[:2])
    except Exception as exc:  # noqa: BLE001 - any ORT refusal means "not runnable here"
        return str(exc).splitlines()[0][:200]
    return None if np.all(np.isfinite(out)) else "non-finite outputs"


_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(uint8)": np.uint8}


def _input_of(onnx_bytes: bytes) -> tuple[str, Any]:
    """The name and numpy dtype of the model's first input."""
    from models_registry.ml.evaluate import ort_session

    first = ort_session(onnx_bytes).get_inputs()[0]
    return first.name, _ORT_DTYPES.get(first.type, np.float32)


def _probe_inputs(onnx_bytes: bytes) -> npt.NDArray[Any]:
    import onnx

    dims = onnx.load_from_string(onnx_bytes).graph.input[0].type.tensor_type.shape.dim
    features = [d.dim_value if d.dim_value > 0 else 1 for d in dims[1:]]
    _, dtype = _input_of(onnx_bytes)
    rng = np.random.default_rng(0)
    if dtype == np.float32:
        return rng.random((2, *features), dtype=np.float32)
    return rng.integers(0, 2, size=(2, *features)).astype(dtype)


# --------------------------------------------------------------------------- int8 dynamic


def quantize_dynamic_int8(onnx_bytes: bytes, *, per_channel: bool = True) -> Variant:
    """Dynamic int8 quantisation with ONNX Runtime (weights int8, activations at run time).

    Weights are stored as int8 (per output channel when ``per_channel``); activations are
    quantised on the fly, so no calibration data is needed. ORT's CPU provider has no
    ConvInteger kernel for int8 weights, so when quantising convolutions yields a model
    that does not load, only the linear layers are quantised (recorded in ``details``).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    _quiet_ort()
    probe = _probe_inputs(onnx_bytes)
    present = _op_types(onnx_bytes)
    # "MatMul" must be requested even for a graph of Gemm nodes: ORT 1.23's dynamic
    # quantiser leaves Gemm alone when asked for ["Gemm"] only.
    linear = ["Gemm", "MatMul"]
    attempts = [["Conv", *linear], linear] if "Conv" in present else [linear]
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(_with_node_names(onnx_bytes))
        for ops in attempts:
            with _quiet_quantiser():
                quantize_dynamic(
                    src,
                    dst,
                    weight_type=QuantType.QInt8,
                    per_channel=per_channel,
                    op_types_to_quantize=ops,
                )
            out = compact_onnx(dst.read_bytes())
            error = _session_ok(out, probe)
            integer_nodes = sorted(_op_types(out) & {"MatMulInteger", "ConvInteger"})
            if error is None and not integer_nodes:
                error = "no operator was quantised"
            if error is None:
                description = f"int8 dynamic ({'per-channel' if per_channel else 'per-tensor'})"
                return Variant(
                    name="int8_dynamic",
                    onnx_bytes=out,
                    description=f"{description}, quantised ops {ops}",
                    details={
                        "op_types": ops,
                        "integer_ops": integer_nodes,
                        "per_channel": per_channel,
                        "skipped": skipped,
                    },
                )
            skipped.update({op: error for op in set(ops) - set(attempts[-1])})
    raise ValueError(f"dynamic quantisation produced no runnable model: {skipped}")


# --------------------------------------------------------------------------- int8 static


def _interleaved_timing(
    models: Sequence[bytes], x: npt.NDArray[Any], *, repeats: int, rounds: int = 5
) -> list[dict[str, float]]:
    """p50 latency at batch 1 and 64 for each model, measured round-robin.

    Shared machines drift in speed; timing every model once per round and taking the
    median over rounds keeps a slow moment from deciding the comparison.
    """
    from models_registry.ml.evaluate import measure_latency, ort_session

    sessions = [ort_session(model, threads=1) for model in models]
    per_round: list[list[tuple[float, float]]] = [[] for _ in models]
    for _ in range(rounds):
        for index, session in enumerate(sessions):
            b1 = measure_latency(onnx_bytes=b"", x=x, batch=1, repeats=repeats, warmup=5, session=session)
            b64 = measure_latency(
                onnx_bytes=b"",
                x=x,
                batch=64,
                repeats=max(5, repeats // 4),
                warmup=2,
                session=session,
            )
            per_round[index].append((b1["p50_us"], b64["p50_us"]))
    return [
        {
            "p50_batch1_us": float(np.median([r[0] for r in rows])),
            "p50_batch64_us": float(np.median([r[1] for r in rows])),
        }
        for rows in per_round
    ]


class _Batches:
    """ORT calibration reader over fixed batches of the calibration data."""

    def __init__(self, name: str, x: npt.NDArray[Any], batch: int = 32) -> None:
        self._items = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, npt.NDArray[Any]] | None:
        return next(self._items, None)


def _static_quantise(onnx_bytes: bytes, x: npt.NDArray[Any], ops: Sequence[str]) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_Batches, CalibrationDataReader):
        pass

    input_name, _ = _input_of(onnx_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(_with_node_names(onnx_bytes))
        with _quiet_quantiser():
            quantize_static(
                src,
                dst,
                Reader(input_name, x),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(ops),
                per_channel=True,
                # u8 activations with s8 weights is what ORT's x86 kernels are built for.
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
        return compact_onnx(dst.read_bytes())


def quantize_static_int8(
    onnx_bytes: bytes,
    calibration_x: npt.ArrayLike,
    *,
    op_types: Sequence[str] | None = None,
    calibration_y: npt.ArrayLike | None = None,
    spec: FamilySpec | None = None,
    max_metric_drop: float = 0.01,
    latency_repeats: int = 40,
) -> Variant:
    """Static int8 quantisation in QDQ format, calibrated (min/max) on ``calibration_x``.

    With ``op_types`` given, exactly those operator types are quantised. Otherwise the
    operator groups present in the model (convolutions; Gemm/MatMul) are tried alone and
    together, each candidate is timed in ONNX Runtime on this CPU (single thread, p50 at
    batch 1 and 64) and scored on the calibration data with the family's primary metric
    (``spec``; accuracy without one) against ``calibration_y``, or against the fp32
    model's own outputs when no labels are given. The fastest candidate at batch 1 whose
    metric is at most ``max_metric_drop`` worse than fp32's is kept. Every measurement,
    including the fp32 reference, is in ``details["candidates"]``.
    """
    from models_registry.ml.evaluate import model_inputs

    _quiet_ort()
    x = model_inputs(calibration_x)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"calibration_x must be a non-empty batch, got shape {x.shape}")
    higher = spec is None or spec.higher_is_better
    metric = "accuracy" if spec is None else spec.primary_metric
    if calibration_y is not None:
        y = np.asarray(calibration_y)
    elif spec is None or spec.task == "classification":
        y = _outputs(onnx_bytes, x).argmax(axis=1)
    else:
        y = _outputs(onnx_bytes, x).astype(np.float32)
    if len(y) != len(x):
        raise ValueError(f"calibration_y must hold {len(x)} labels, got {len(y)}")
    present = _op_types(onnx_bytes)
    if op_types is not None:
        candidates = [tuple(op_types)]
    else:
        groups = [
            tuple(op for op in ops if op in present) for ops in _STATIC_GROUPS.values() if present & set(ops)
        ]
        candidates = list(groups)
        if len(groups) > 1:
            candidates.append(tuple(op for g in groups for op in g))
    if not candidates:
        raise ValueError(f"no quantisable operators in the model (ops: {sorted(present)})")

    reference = _quality(onnx_bytes, x, y, spec)
    measured: list[dict[str, Any]] = [{"op_types": [], metric: reference, "fp32": True}]
    models: list[bytes] = [onnx_bytes]
    built: list[tuple[dict[str, Any], bytes]] = []
    for ops in candidates:
        model = _static_quantise(onnx_bytes, x, ops)
        error = _session_ok(model, x)
        row: dict[str, Any] = {"op_types": list(ops)}
        if error is not None:
            row["error"] = error
        else:
            row[metric] = _quality(model, x, y, spec)
            row["metric_ok"] = (
                metric_drop(reference, row[metric], higher_is_better=higher) <= max_metric_drop + 1e-12
            )
            built.append((row, model))
            models.append(model)
        measured.append(row)
    timed = [row for row in measured if "error" not in row]
    for row, timing in zip(timed, _interleaved_timing(models, x, repeats=latency_repeats), strict=True):
        row.update(timing)
    usable = [(row, model) for row, model in built if row["metric_ok"]] or built
    if not usable:
        raise ValueError(f"static quantisation produced no runnable model: {measured}")
    best_row, best = min(usable, key=lambda item: item[0]["p50_batch1_us"])
    best_row["chosen"] = True
    return Variant(
        name="int8_static",
        onnx_bytes=best,
        description=f"int8 static QDQ (per-channel weights, u8 activations), ops {best_row['op_types']}",
        details={
            "candidates": measured,
            "op_types": best_row["op_types"],
            "metric": metric,
            "max_metric_drop": max_metric_drop,
        },
    )


# --------------------------------------------------------------------------- fp16


def convert_fp16(onnx_bytes: bytes) -> Variant:
    """Store every float32 initializer as float16, keeping float32 inputs, outputs and math.

    Each converted initializer is followed by a ``Cast`` back to float32, so the graph's
    interface and arithmetic stay float32 (ORT's CPU provider lacks float16 kernels for
    most operators) and only the stored weights halve. ORT folds the casts once when the
    session is created, so inference costs the same as fp32. Values beyond float16's
    range are clipped to +-65504 rather than becoming infinite.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    casts = []
    kept = []
    converted = 0
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            kept.append(init)
            continue
        array = numpy_helper.to_array(init)
        limit = float(np.finfo(np.float16).max)
        half = np.clip(array, -limit, limit).astype(np.float16)
        stored = f"{init.name}::fp16"
        kept.append(numpy_helper.from_array(half, stored))
        casts.append(helper.make_node("Cast", [stored], [init.name], to=TensorProto.FLOAT))
        converted += int(array.size)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = list(graph.node)
    del graph.node[:]
    # The casts come first so the graph stays topologically sorted.
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(model)
    out = compact_onnx(bytes(model.SerializeToString()))
    return Variant(
        name="fp16",
        onnx_bytes=out,
        description="fp16 weights, fp32 inputs/outputs and compute (initializers cast at load)",
        details={"converted_scalars": converted, "casts": len(casts)},
    )


# --------------------------------------------------------------------------- trained variants


def _training_data(
    spec: FamilySpec, x: npt.ArrayLike, y: npt.ArrayLike
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """``(x, y)`` as the family's inputs and labels, or ``ValueError`` saying why not."""
    from devices_agent.family import SpecError

    try:
        xs = spec.inputs(x)
        ys = spec.labels(y, count=len(xs))
    except SpecError as exc:
        raise ValueError(f"the training data does not fit the family: {exc.message}") from None
    return xs, ys


def _weights_file(state: Mapping[str, npt.ArrayLike], variant: str) -> bytes:
    from devices_agent.codecs import encode_tensors

    arrays = {name: np.ascontiguousarray(value) for name, value in state.items()}
    return encode_tensors(arrays, metadata={"format": "flotilla-weights/1", "variant": variant})


def _magnitude_mask(weight: npt.NDArray[Any], amount: float) -> npt.NDArray[np.bool_]:
    """Keep-mask zeroing exactly ``round(amount * size)`` entries of smallest magnitude (ties by position)."""
    flat = np.abs(np.asarray(weight, dtype=np.float64)).ravel()
    drop = int(round(amount * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if drop:
        keep[np.argsort(flat, kind="stable")[:drop]] = False
    return keep.reshape(np.shape(weight))


def prune_unstructured(
    *,
    program: bytes,
    state: Mapping[str, npt.ArrayLike],
    onnx_bytes: bytes,
    spec: FamilySpec,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    amount: float,
    finetune_epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 32,
    quantise: bool = False,
    num_threads: int | None = 1,
) -> Variant:
    """Magnitude pruning of a program's weight tensors, fine-tuned, written into its ONNX graph.

    Every trainable parameter with two or more dimensions (linear weights, convolution
    kernels; not biases or norms) loses the ``amount`` fraction of its entries with the
    smallest absolute value. Fine-tuning then trains all trainable parameters on
    ``(x, y)`` for ``finetune_epochs`` epochs with the boards' own trainer
    (``TorchBackend``, Adam, the task's loss, one epoch at a time with the mask applied
    again after each), so the pruned entries stay exactly zero. The variant keeps the
    program; its graph is ``onnx_bytes`` with the new weights replaced by name. Zeros
    stored densely take as much room as any value: the size win comes from compression
    (``compressed_size_bytes``) and from ``quantise=True``, which returns the dynamic
    int8 graph of the pruned model instead (the weights then travel without a program:
    the quantised graph no longer holds them by name).
    """
    from devices_agent.backends import TrainConfig
    from devices_agent.backends.torch_backend import TorchBackend
    from devices_agent.program import inspect_program
    from models_registry.ml.onnx_weights import onnx_with_weights

    if not 0.0 <= amount < 1.0:
        raise ValueError("amount must be in [0, 1)")
    if finetune_epochs < 0:
        raise ValueError("finetune_epochs must not be negative")
    info = inspect_program(program)
    xs, ys = _training_data(spec, x, y)
    current: Weights = {name: np.array(value, copy=True) for name, value in state.items()}
    prunable = [name for name, shape in info.parameters.items() if len(shape) >= 2]
    if not prunable:
        raise ValueError("the program has no weight matrices or kernels to prune")
    masks = {name: _magnitude_mask(current[name], amount) for name in prunable}

    def apply_masks() -> None:
        for name, keep in masks.items():
            current[name] = np.where(keep, current[name], 0).astype(np.float32)

    apply_masks()
    backend = TorchBackend(num_threads=num_threads)
    trainable = list(info.parameters)
    losses: list[float] = []
    for epoch in range(finetune_epochs):
        result = backend.train(
            program=program,
            state=current,
            spec=spec,
            x=xs,
            y=ys,
            config=TrainConfig(epochs=1, batch_size=batch_size, lr=lr, optimizer="adam", seed=seed + epoch),
            trainable=trainable,
        )
        for name, delta in result.delta.items():
            current[name] = (current[name].astype(np.float32) + delta).astype(np.float32)
        apply_masks()
        losses.append(float(result.metrics["train_loss"]))
    total = sum(int(current[n].size) for n in prunable)
    sparsity = float(sum(int(np.sum(current[n] == 0)) for n in prunable) / total)
    onnx = onnx_with_weights(onnx_bytes, {name: current[name] for name in trainable})
    details: dict[str, Any] = {
        "amount": amount,
        "sparsity": sparsity,
        "pruned": prunable,
        "finetune_epochs": finetune_epochs,
        "train_losses": losses,
    }
    description = f"unstructured magnitude pruning {amount:.0%}, fine-tuned {finetune_epochs} epochs"
    if quantise:
        quantised = quantize_dynamic_int8(onnx)
        return Variant(
            name="pruned_unstructured_int8",
            onnx_bytes=quantised.onnx_bytes,
            description=f"{description}, int8 dynamic",
            weights=current,
            weights_safetensors=_weights_file(current, "pruned_unstructured"),
            details={**details, **quantised.details},
        )
    return Variant(
        name="pruned_unstructured",
        onnx_bytes=onnx,
        description=f"{description}, fp32",
        weights=current,
        weights_safetensors=_weights_file(current, "pruned_unstructured"),
        program=program,
        details=details,
    )


def distil(
    *,
    teacher_onnx: bytes,
    student_program: bytes,
    student_state: Mapping[str, npt.ArrayLike],
    student_onnx: bytes,
    spec: FamilySpec,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    epochs: int,
    temperature: float,
    alpha: float,
    lr: float,
    seed: int,
    batch_size: int = 32,
    num_threads: int | None = 1,
) -> Variant:
    """Knowledge distillation of a teacher (any ONNX graph) into a student's program.

    The student starts from ``student_state`` and trains all its trainable parameters
    with Adam on shuffled mini-batches (seeded). Classification (Hinton et al.): per
    batch ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha)
    * CE(student, y)``; the ``T^2`` keeps the soft-target gradients on the scale of the
    hard-label ones whatever the temperature. Regression: ``alpha * MSE(student,
    teacher) + (1 - alpha) * MSE(student, y)`` (the temperature does not apply). The
    teacher's outputs are computed once, up front, in ONNX Runtime. The variant keeps the
    student's program; its graph is ``student_onnx`` with the new weights by name.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812 - the conventional alias

    from devices_agent.backends.torch_backend import torch_threads
    from devices_agent.program import inspect_program, load_program
    from models_registry.ml.evaluate import _parameter_count
    from models_registry.ml.onnx_weights import onnx_with_weights

    if not temperature > 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError("temperature must be positive and alpha in [0, 1]")
    if epochs < 1:
        raise ValueError("epochs must be at least 1")
    xs, ys = _training_data(spec, x, y)
    teacher = _outputs(teacher_onnx, xs)
    if teacher.shape[1] != spec.outputs:
        raise ValueError(
            f"the teacher returns {teacher.shape[1]} values per example, the family needs {spec.outputs}"
        )
    classification = spec.task == "classification"
    info = inspect_program(student_program)
    names = list(info.parameters)
    losses: list[float] = []
    with torch_threads(num_threads):
        student = load_program(
            student_program, student_state, input_shape=spec.input_shape, input_dtype=spec.input_dtype
        )
        named = dict(student.named_parameters())
        params = [named[n] for n in names]
        for param in params:
            param.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        x_t = torch.from_numpy(np.ascontiguousarray(xs))
        if classification:
            # Log-probabilities: a teacher whose graph ends in a softmax distils the same way.
            logits = torch.from_numpy(np.log(np.clip(probabilities(teacher), 1e-12, 1.0))).float()
            soft = F.log_softmax(logits / temperature, dim=1)
            y_t = torch.from_numpy(np.asarray(ys, dtype=np.int64))
        else:
            soft = torch.from_numpy(teacher.astype(np.float32))
            y_t = torch.from_numpy(np.asarray(ys, dtype=np.float32).reshape(len(ys), -1))
        generator = torch.Generator().manual_seed(int(seed))
        for _ in range(epochs):
            order = torch.randperm(len(y_t), generator=generator)
            total = 0.0
            for start in range(0, len(y_t), batch_size):
                batch = order[start : start + batch_size]
                opt.zero_grad()
                out = student(x_t[batch])
                if classification:
                    log_student = F.log_softmax(out / temperature, dim=1)
                    kd = F.kl_div(log_student, soft[batch], reduction="batchmean", log_target=True)
                    loss = alpha * temperature**2 * kd + (1 - alpha) * F.cross_entropy(out, y_t[batch])
                else:
                    out = out.reshape(len(batch), -1)
                    loss = alpha * F.mse_loss(out, soft[batch]) + (1 - alpha) * F.mse_loss(out, y_t[batch])
                if not torch.isfinite(loss):
                    raise ValueError(f"distillation diverged (loss {loss.item()}); try a smaller lr")
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(batch)
            losses.append(total / len(y_t))
        new = {n: named[n].detach().numpy().astype(np.float32, copy=True) for n in names}
    state: Weights = {**{k: np.asarray(v) for k, v in student_state.items()}, **new}
    onnx = onnx_with_weights(student_onnx, new)
    details = {
        "teacher_params": _parameter_count(teacher_onnx),
        "student_params": int(sum(int(np.prod(s, dtype=np.int64)) for s in info.parameters.values())),
        "temperature": temperature,
        "alpha": alpha,
        "epochs": epochs,
        "losses": losses,
    }
    what = f"T={temperature}, alpha={alpha}" if classification else f"alpha={alpha}"
    return Variant(
        name="distilled",
        onnx_bytes=onnx,
        description=f"distilled into the student's program ({what}, {epochs} epochs)",
        weights=state,
        weights_safetensors=_weights_file(state, "distilled"),
        program=student_program,
        details=details,
    )
