"""``flotilla-agent selftest``: prove a board can serve and train models, not just import.

Provisioning runs it after installing the agent: an ``import onnxruntime`` that succeeds
says little (a wrong wheel for the CPU, a missing system library show up only when a
model runs), so this runs a real inference on a small ONNX graph built here, byte for
byte, without the ``onnx`` package the board does not have; with ``--train`` it also
captures a small PyTorch model as a program, loads it back the way rounds do (without
pickle) and takes a training step with every backend the board has.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np

__all__ = ["selftest", "tiny_onnx"]

# The distributions that may provide each module: ONNX Runtime's builds have names of their own.
_DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "onnxruntime": ("onnxruntime", "onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime-gpu"),
    "torch": ("torch",),
}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes | str | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint((number << 3) | 2) + _varint(len(data)) + data


def _value_info(name: str, dims: list[int | str]) -> bytes:
    shape = b"".join(
        _field(1, _field(2, d) if isinstance(d, str) else _field(1, d)) for d in dims
    )  # TensorShapeProto.dim: dim_value (1) or dim_param (2)
    tensor_type = _field(1, 1) + _field(2, shape)  # elem_type FLOAT, shape
    return _field(1, name) + _field(2, _field(1, tensor_type))  # ValueInfo.name, .type.tensor_type


def tiny_onnx(weights: np.ndarray[Any, Any]) -> bytes:
    """ONNX bytes of ``y = x @ weights`` (opset 17), from the protobuf wire format directly."""
    rows, cols = (int(d) for d in weights.shape)
    w = np.ascontiguousarray(weights, dtype="<f4")
    initializer = _field(1, rows) + _field(1, cols) + _field(2, 1) + _field(8, "w") + _field(9, w.tobytes())
    node = _field(1, "x") + _field(1, "w") + _field(2, "y") + _field(4, "MatMul")
    graph = (
        _field(1, node)
        + _field(2, "selftest")
        + _field(5, initializer)
        + _field(11, _value_info("x", ["batch", rows]))
        + _field(12, _value_info("y", ["batch", cols]))
    )
    opset = _field(1, "") + _field(2, 17)
    return _field(1, 8) + _field(7, graph) + _field(8, opset)  # ir_version, graph, opset_import


def _inference() -> dict[str, Any]:
    from devices_agent.inference import load_session

    weights = np.arange(12, dtype=np.float32).reshape(4, 3) / 10.0
    session = load_session(tiny_onnx(weights))
    x = np.ones((2, 4), dtype=np.float32)
    started = time.perf_counter()
    y = session.run(None, {"x": x})[0]
    elapsed = (time.perf_counter() - started) * 1000.0
    ok = bool(np.allclose(y, x @ weights, atol=1e-5))
    return {"ok": ok, "latency_ms": round(elapsed, 3), "reason": "" if ok else "wrong outputs"}


def _torch_training() -> dict[str, Any]:
    import torch

    from devices_agent.backends import TrainConfig, get_backend
    from devices_agent.codecs import decode_tensors, encode_tensors
    from devices_agent.family import FamilySpec
    from devices_agent.program import capture_program

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    # The program and weights as a round brings them; no ONNX export, which needs the onnx
    # package that boards do not get (they train programs, they never export them).
    program, captured = capture_program(model, torch.randn(4, 4))
    state, _ = decode_tensors(encode_tensors(captured))
    spec = FamilySpec(task="classification", input_shape=(4,), num_classes=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=16)
    result = get_backend("torch").train(
        program=program, state=state, spec=spec, x=x, y=y, config=TrainConfig(epochs=1, lr=0.1)
    )
    return {"ok": result.metrics["delta_norm"] > 0, "steps": result.metrics["steps"]}


def _ort_training() -> dict[str, Any]:
    # Training graphs are built by the server for each version (the board has no onnx
    # package to build them); here the training API must load.
    import onnxruntime

    from devices_agent.backends.ort_backend import training_api

    api = training_api()
    return {
        "ok": hasattr(api, "Module"),
        "onnxruntime": onnxruntime.__version__,
        "trains_from": "ort_training",
    }


def _training() -> dict[str, Any]:
    from devices_agent.backends import available_backends

    checks = {"torch": _torch_training, "ort": _ort_training}
    results: dict[str, dict[str, Any]] = {}
    for name in available_backends():
        try:
            results[name] = checks[name]()
        except Exception as exc:  # noqa: BLE001 - reported, that is the point
            results[name] = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"[:500]}
    return {"ok": bool(results) and all(r["ok"] for r in results.values()), "backends": results}


def selftest(*, train: bool = False) -> dict[str, Any]:
    """Run the checks; a JSON-ready report whose ``ok`` says whether all passed."""
    import importlib.metadata

    report: dict[str, Any] = {"python": platform.python_version(), "machine": platform.machine()}
    for package, distributions in _DISTRIBUTIONS.items():
        report[package] = None
        for distribution in distributions:
            try:
                report[package] = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    try:
        report["inference"] = _inference()
    except Exception as exc:  # noqa: BLE001
        report["inference"] = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"[:500]}
    ok = bool(report["inference"]["ok"])
    if train:
        try:
            report["training"] = _training()
        except Exception as exc:  # noqa: BLE001
            report["training"] = {"ok": False, "reason": f"{type(exc).__name__}: {exc}"[:500]}
        ok = ok and bool(report["training"]["ok"])
    report["ok"] = ok
    return report
