"""Derived model variants: int8 (dynamic and static), fp16, pruned, distilled.

Each function takes an exported fp32 model (ONNX bytes) or the weights of a named
architecture and returns a :class:`Variant`: the ONNX bytes, a one-line description, the
measurements behind any choice it made, and, for variants produced by training in torch,
the new weights (also as safetensors bytes, the registry's weights format).

ONNX graphs are compacted before they are returned (:func:`compact_onnx`): doc strings,
node names and long intermediate tensor names are protobuf overhead that, for models
this small, weighs as much as a third of the int8 weights.
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from devices_agent.codecs import encode_tensors

if TYPE_CHECKING:
    import torch

__all__ = [
    "PruneResult",
    "Variant",
    "compact_onnx",
    "convert_fp16",
    "distil",
    "prune_magnitude",
    "quantize_dynamic_int8",
    "quantize_static_int8",
]

Weights = dict[str, npt.NDArray[np.float32]]
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
    arch: str | None = None
    weights: Weights | None = None
    weights_safetensors: bytes | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """Size of the ONNX artifact in bytes."""
        return len(self.onnx_bytes)

    @property
    def compressed_size_bytes(self) -> int:
        """Size after zlib level 9: what a compressed download carries (zeros shrink here)."""
        return len(zlib.compress(self.onnx_bytes, 9))


@dataclass(frozen=True)
class PruneResult:
    """A pruned model as fp32 ONNX and as dynamic-int8 ONNX, with its weights."""

    fp32: Variant
    int8: Variant
    weights: Weights
    sparsity: float
    widths: tuple[int, ...]


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


def _fp32_predictions(onnx_bytes: bytes, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    from models_registry.ml.export import run_onnx

    return np.asarray(run_onnx(onnx_bytes, x).argmax(axis=1), dtype=np.int64)


def _accuracy(onnx_bytes: bytes, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64]) -> float:
    return float(np.mean(_fp32_predictions(onnx_bytes, x) == y))


def _op_types(onnx_bytes: bytes) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load_from_string(onnx_bytes).graph.node}


def _session_ok(onnx_bytes: bytes, x: npt.NDArray[np.float32]) -> str | None:
    from models_registry.ml.export import run_onnx

    try:
        out = run_onnx(onnx_bytes, x[:2])
    except Exception as exc:  # noqa: BLE001 - any ORT refusal means "not runnable here"
        return str(exc).splitlines()[0][:200]
    return None if np.all(np.isfinite(out)) else "non-finite outputs"


def _probe_inputs(onnx_bytes: bytes) -> npt.NDArray[np.float32]:
    import onnx

    dims = onnx.load_from_string(onnx_bytes).graph.input[0].type.tensor_type.shape.dim
    features = [d.dim_value if d.dim_value > 0 else 1 for d in dims[1:]]
    return np.random.default_rng(0).random((2, *features), dtype=np.float32)


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
    models: Sequence[bytes], x: npt.NDArray[np.float32], *, repeats: int, rounds: int = 5
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

    def __init__(self, name: str, x: npt.NDArray[np.float32], batch: int = 32) -> None:
        self._items = iter([{name: x[i : i + batch]} for i in range(0, len(x), batch)])

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        return next(self._items, None)


def _static_quantise(onnx_bytes: bytes, x: npt.NDArray[np.float32], ops: Sequence[str]) -> bytes:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(_Batches, CalibrationDataReader):
        pass

    from models_registry.ml.export import INPUT_NAME

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(_with_node_names(onnx_bytes))
        with _quiet_quantiser():
            quantize_static(
                src,
                dst,
                Reader(INPUT_NAME, x),
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
    max_accuracy_drop: float = 0.01,
    latency_repeats: int = 40,
) -> Variant:
    """Static int8 quantisation in QDQ format, calibrated (min/max) on ``calibration_x``.

    With ``op_types`` given, exactly those operator types are quantised. Otherwise the
    operator groups present in the model (convolutions; Gemm/MatMul) are tried alone and
    together, each candidate is timed in ONNX Runtime on this CPU (single thread, p50 at
    batch 1 and 64) and scored on the calibration data (against ``calibration_y``, or
    against the fp32 model's own predictions when no labels are given); the fastest
    candidate at batch 1 that loses at most ``max_accuracy_drop`` accuracy is kept. Every
    measurement, including the fp32 reference, is in ``details["candidates"]``.
    """
    _quiet_ort()
    x = np.ascontiguousarray(calibration_x, dtype=np.float32)
    if x.ndim < 2 or len(x) == 0:
        raise ValueError(f"calibration_x must be a non-empty batch, got shape {x.shape}")
    y = (
        _fp32_predictions(onnx_bytes, x)
        if calibration_y is None
        else np.asarray(calibration_y, dtype=np.int64)
    )
    if y.shape != (len(x),):
        raise ValueError(f"calibration_y must have shape ({len(x)},), got {y.shape}")
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

    reference_accuracy = _accuracy(onnx_bytes, x, y)
    measured: list[dict[str, Any]] = [{"op_types": [], "accuracy": reference_accuracy, "fp32": True}]
    models: list[bytes] = [onnx_bytes]
    built: list[tuple[dict[str, Any], bytes]] = []
    for ops in candidates:
        model = _static_quantise(onnx_bytes, x, ops)
        error = _session_ok(model, x)
        row: dict[str, Any] = {"op_types": list(ops)}
        if error is not None:
            row["error"] = error
        else:
            row["accuracy"] = _accuracy(model, x, y)
            row["accuracy_ok"] = reference_accuracy - row["accuracy"] <= max_accuracy_drop
            built.append((row, model))
            models.append(model)
        measured.append(row)
    timed = [row for row in measured if "error" not in row]
    for row, timing in zip(timed, _interleaved_timing(models, x, repeats=latency_repeats), strict=True):
        row.update(timing)
    usable = [(row, model) for row, model in built if row["accuracy_ok"]] or built
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
            "max_accuracy_drop": max_accuracy_drop,
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


# --------------------------------------------------------------------------- torch helpers


def _fit(
    model: torch.nn.Module,
    *,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    num_threads: int | None,
) -> None:
    """Adam over shuffled mini-batches; ``loss_fn(logits, y, batch_index)``."""
    from devices_agent.local_train import torch_threads

    with torch_threads(num_threads):
        _fit_loop(model, x=x, y=y, epochs=epochs, lr=lr, seed=seed, batch_size=batch_size, loss_fn=loss_fn)


def _fit_loop(
    model: torch.nn.Module,
    *,
    x: npt.NDArray[np.float32],
    y: npt.NDArray[np.int64],
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> None:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x_t[batch]), y_t[batch], batch)
            loss.backward()
            opt.step()
    model.eval()


def _check_xy(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    xs = np.ascontiguousarray(x, dtype=np.float32)
    ys = np.asarray(y, dtype=np.int64)
    if xs.ndim != 2 or ys.shape != (len(xs),) or len(xs) == 0:
        raise ValueError(f"need x (N, F) and y (N,), got {xs.shape} and {ys.shape}")
    return xs, ys


def _variant_from_weights(
    *,
    name: str,
    arch: str,
    weights: Weights,
    sample: npt.NDArray[np.float32],
    description: str,
    details: dict[str, Any],
) -> Variant:
    from models_registry.ml.export import export_onnx

    exported = export_onnx(arch=arch, weights=weights, sample_inputs=sample[:64])
    return Variant(
        name=name,
        onnx_bytes=compact_onnx(exported.onnx_bytes),
        description=description,
        arch=arch,
        weights=weights,
        weights_safetensors=encode_tensors(weights, metadata={"arch": arch, "variant": name}),
        details={**details, "export_max_abs_diff": exported.max_abs_diff},
    )


# --------------------------------------------------------------------------- pruning


# How each prunable layer's outputs feed the next layer: (layer, consumer, inputs of the
# consumer per output of the layer). The CNN's conv2 feeds the linear head through a
# 4x4 flatten, so each of its channels owns 16 consecutive head inputs.
_CHAINS: dict[str, tuple[tuple[str, str, int], ...]] = {
    "mlp": (("fc1", "fc2", 1), ("fc2", "fc3", 1)),
    "mlp_small": (("fc1", "fc2", 1),),
    "cnn": (("conv1", "conv2", 1), ("conv2", "fc", 16)),
}


def _compact(arch: str, state: Weights) -> Weights:
    """Physically remove neurons/channels whose weights and bias are all zero."""
    out = {k: v.copy() for k, v in state.items()}
    for layer, consumer, group in _CHAINS[arch]:
        weight, bias = out[f"{layer}.weight"], out[f"{layer}.bias"]
        rows = weight.reshape(weight.shape[0], -1)
        alive = np.flatnonzero(np.any(rows != 0, axis=1) | (bias != 0))
        if len(alive) == 0:
            alive = np.array([0])  # keep one (zero) unit so the graph stays valid
        out[f"{layer}.weight"] = weight[alive]
        out[f"{layer}.bias"] = bias[alive]
        nxt = out[f"{consumer}.weight"]
        # A zero unit outputs relu(0) = 0, so dropping its input column is exact.
        split = nxt.reshape(nxt.shape[0], -1, group, *nxt.shape[2:])
        out[f"{consumer}.weight"] = np.ascontiguousarray(
            split[:, alive].reshape(nxt.shape[0], len(alive) * group, *nxt.shape[2:])
        )
    return out


def prune_magnitude(
    *,
    arch: str,
    weights: Mapping[str, npt.ArrayLike],
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    amount: float,
    structured: bool,
    finetune_epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 32,
    num_threads: int | None = 1,
) -> PruneResult:
    """Magnitude pruning with ``torch.nn.utils.prune``, fine-tuning, and real size reduction.

    Unstructured: each layer's weights lose the ``amount`` fraction with the smallest
    absolute value (L1). Zeros stored densely take as much room as any value, so the
    size win comes from the int8 variant and from compression (``compressed_size_bytes``).

    Structured: each hidden layer (``ARCHS[arch]["prunable"]``) loses the ``amount``
    fraction of its output neurons/channels with the smallest L2 norm, their biases
    included; after fine-tuning the dead units are removed from the weights, so the model
    is genuinely narrower (``widths``) and its fp32 artifact smaller.

    Masks stay applied while fine-tuning for ``finetune_epochs`` (Adam, ``lr``) on
    ``(x, y)`` and are then made permanent.
    """
    import torch
    from torch.nn.utils import prune

    from config.demo.nets import ARCHS, build_model_for_state, state_to_numpy, widths_of_state

    if not 0.0 <= amount < 1.0:
        raise ValueError("amount must be in [0, 1)")
    xs, ys = _check_xy(x, y)
    model = build_model_for_state(arch, weights)
    modules = dict(model.named_modules())
    pruned: list[tuple[torch.nn.Module, str]] = []
    if structured:
        for name in ARCHS[arch]["prunable"]:
            module = modules[name]
            prune.ln_structured(module, "weight", amount=amount, n=2, dim=0)
            mask = module.weight_mask.reshape(module.weight_mask.shape[0], -1).any(dim=1)
            prune.custom_from_mask(module, "bias", mask.float())
            pruned += [(module, "weight"), (module, "bias")]
    else:
        for module in modules.values():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                prune.l1_unstructured(module, "weight", amount=amount)
                pruned.append((module, "weight"))
    _fit(
        model,
        x=xs,
        y=ys,
        epochs=finetune_epochs,
        lr=lr,
        seed=seed,
        batch_size=batch_size,
        loss_fn=lambda logits, target, _: torch.nn.functional.cross_entropy(logits, target),
        num_threads=num_threads,
    )
    for module, param in pruned:
        prune.remove(module, param)
    state = state_to_numpy(model)
    weight_names = [n for n in state if n.endswith(".weight")]
    total = sum(state[n].size for n in weight_names)
    sparsity = float(sum(int(np.sum(state[n] == 0)) for n in weight_names) / total)
    if structured:
        state = _compact(arch, state)
    kind = "structured L2 (units removed)" if structured else "unstructured L1"
    widths = widths_of_state(arch, state)
    details = {
        "amount": amount,
        "structured": structured,
        "sparsity": sparsity,
        "widths": list(widths),
        "finetune_epochs": finetune_epochs,
    }
    name = "pruned_structured" if structured else "pruned_unstructured"
    fp32 = _variant_from_weights(
        name=name,
        arch=arch,
        weights=state,
        sample=xs,
        description=f"{kind} pruning {amount:.0%}, fine-tuned, fp32",
        details=details,
    )
    quantised = quantize_dynamic_int8(fp32.onnx_bytes)
    int8 = Variant(
        name=f"{name}_int8",
        onnx_bytes=quantised.onnx_bytes,
        description=f"{kind} pruning {amount:.0%}, fine-tuned, int8 dynamic",
        arch=arch,
        weights=state,
        weights_safetensors=fp32.weights_safetensors,
        details={**details, **quantised.details},
    )
    return PruneResult(fp32=fp32, int8=int8, weights=state, sparsity=sparsity, widths=widths)


# --------------------------------------------------------------------------- distillation


def distil(
    *,
    teacher_arch: str,
    teacher_weights: Mapping[str, npt.ArrayLike],
    student_arch: str,
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
    """Knowledge distillation (Hinton et al.) of a teacher into a fresh ``student_arch``.

    Loss per batch: ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) +
    (1 - alpha) * CE(student, y)``. The ``T^2`` factor keeps the soft-target gradients on
    the same scale as the hard-label ones whatever the temperature. The teacher's logits
    are computed once, up front.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812 - the conventional alias

    from config.demo.nets import (
        build_model_for_state,
        initial_weights,
        parameter_count,
        state_to_numpy,
    )

    if not temperature > 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError("temperature must be positive and alpha in [0, 1]")
    xs, ys = _check_xy(x, y)
    teacher = build_model_for_state(teacher_arch, teacher_weights).eval()
    with torch.no_grad():
        soft = F.log_softmax(teacher(torch.from_numpy(xs)) / temperature, dim=1)
    student = build_model_for_state(student_arch, initial_weights(student_arch, seed=seed))

    def loss_fn(logits: torch.Tensor, target: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        log_student = F.log_softmax(logits / temperature, dim=1)
        kd = F.kl_div(log_student, soft[batch], reduction="batchmean", log_target=True)
        return alpha * temperature**2 * kd + (1 - alpha) * F.cross_entropy(logits, target)

    _fit(
        student,
        x=xs,
        y=ys,
        epochs=epochs,
        lr=lr,
        seed=seed,
        batch_size=batch_size,
        loss_fn=loss_fn,
        num_threads=num_threads,
    )
    state = state_to_numpy(student)
    details = {
        "teacher_arch": teacher_arch,
        "teacher_params": parameter_count(dict(teacher_weights)),
        "student_params": parameter_count(state),
        "temperature": temperature,
        "alpha": alpha,
        "epochs": epochs,
    }
    return _variant_from_weights(
        name=f"distilled_{student_arch}",
        arch=student_arch,
        weights=state,
        sample=xs,
        description=f"{student_arch} distilled from {teacher_arch} (T={temperature}, alpha={alpha})",
        details=details,
    )
