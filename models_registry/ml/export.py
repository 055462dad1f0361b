"""Export a named architecture with given weights to ONNX, and prove the export is faithful.

The exporter is PyTorch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``: with
the pinned torch 2.13 and onnxscript 0.5.4 the ``torch.export``-based exporter fails
offline (it needs an onnxscript release that knows torch 2.11+), while the TorchScript one
works and supports opset 17 directly. The graph has one input ``"input"`` and one output
``"logits"``, both with a dynamic batch axis.

Every export is checked: ONNX Runtime runs the exported graph on the sample inputs (as one
batch and, to exercise the dynamic axis, on the first example alone) and its logits are
compared with the eager torch model's. A disagreement beyond tolerance raises
:class:`ExportParityError` carrying the numbers, so a silently wrong artifact never
reaches the registry.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = [
    "EXPORTER",
    "INPUT_NAME",
    "OUTPUT_NAME",
    "ExportParityError",
    "ExportResult",
    "export_module",
    "export_onnx",
    "make_trace_divergent_module",
    "run_onnx",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTER = "torchscript"


class ExportParityError(ValueError):
    """ONNX Runtime's outputs differ from torch's beyond tolerance."""

    def __init__(self, *, max_abs_diff: float, atol: float, rtol: float, detail: str) -> None:
        super().__init__(
            f"ONNX export does not match torch: max |diff| {max_abs_diff:.3g} "
            f"(atol {atol:g}, rtol {rtol:g}); {detail}"
        )
        self.max_abs_diff = max_abs_diff
        self.atol = atol
        self.rtol = rtol


@dataclass(frozen=True)
class ExportResult:
    """An exported model and the parity check behind it."""

    onnx_bytes: bytes
    opset: int
    max_abs_diff: float
    parity_ok: bool
    exporter: str = EXPORTER


def run_onnx(onnx_bytes: bytes, x: npt.ArrayLike, *, threads: int = 1) -> npt.NDArray[np.float32]:
    """Run an exported model in ONNX Runtime (CPU) and return its logits."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    out = session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    return np.asarray(out, dtype=np.float32)


def export_module(
    *,
    module: torch.nn.Module,
    sample_inputs: npt.ArrayLike,
    opset: int = 17,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportResult:
    """Export any torch ``module`` taking one float tensor and check parity on ``sample_inputs``.

    This is the step behind :func:`export_onnx`; it takes a module so that callers (and
    tests) can export modules that are not one of the named architectures.
    Raises :class:`ExportParityError` when ONNX Runtime disagrees with eager torch.
    """
    import onnx
    import torch

    x = np.ascontiguousarray(sample_inputs, dtype=np.float32)
    if x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"sample_inputs must be a non-empty batch, got shape {x.shape}")
    module.eval()
    x_t = torch.from_numpy(x)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x_t,),
            buffer,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    onnx_bytes = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(onnx_bytes))
    with torch.no_grad():
        expected = module(x_t).detach().numpy().astype(np.float32)
    got = run_onnx(onnx_bytes, x)
    single = run_onnx(onnx_bytes, x[:1])
    if got.shape != expected.shape or single.shape != expected[:1].shape:
        raise ExportParityError(
            max_abs_diff=float("inf"),
            atol=atol,
            rtol=rtol,
            detail=f"output shape {got.shape} vs torch {expected.shape}",
        )
    diff = max(float(np.max(np.abs(got - expected))), float(np.max(np.abs(single - expected[:1]))))
    ok = bool(
        np.allclose(got, expected, atol=atol, rtol=rtol)
        and np.allclose(single, expected[:1], atol=atol, rtol=rtol)
    )
    if not ok or not np.isfinite(diff):
        raise ExportParityError(
            max_abs_diff=diff,
            atol=atol,
            rtol=rtol,
            detail=f"checked {x.shape[0]} sample inputs and a batch of one",
        )
    return ExportResult(onnx_bytes=onnx_bytes, opset=opset, max_abs_diff=diff, parity_ok=True)


def export_onnx(
    *,
    arch: str,
    weights: Mapping[str, npt.ArrayLike],
    sample_inputs: npt.ArrayLike,
    opset: int = 17,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportResult:
    """Export ``arch`` (see :mod:`devices_agent.nets`) with ``weights`` to ONNX.

    The hidden widths are read off ``weights``, so structurally pruned models export too.
    Raises :class:`ExportParityError` when ONNX Runtime's logits on ``sample_inputs``
    differ from torch's beyond ``atol``/``rtol``, and ``ValueError`` when the weights do
    not fit the architecture.
    """
    from config.demo.nets import build_model_for_state

    module = build_model_for_state(arch, weights)
    return export_module(module=module, sample_inputs=sample_inputs, opset=opset, atol=atol, rtol=rtol)


def make_trace_divergent_module(
    *, in_features: int = 64, num_classes: int = 10, seed: int = 0
) -> torch.nn.Module:
    """A module whose exported graph disagrees with its eager forward, for failure-path tests.

    Eager forward returns twice the logits of a linear layer; while ``torch.onnx.export``
    runs, it returns them unscaled, so :func:`export_module` must raise
    :class:`ExportParityError` for it.
    """
    import torch

    class TraceDivergent(torch.nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(in_features, num_classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.fc(x)
            if torch.onnx.is_in_onnx_export():
                return out  # type: ignore[no-any-return, unused-ignore]
            return out * 2.0  # type: ignore[no-any-return, unused-ignore]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module: torch.nn.Module = TraceDivergent()
    return module
