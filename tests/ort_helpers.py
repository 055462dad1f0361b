"""ORT training in tests: artifacts from the pinned builder, training in a torch-less board's
environment (``tests/ort_child.py`` run there), and the torch backend on the same inputs."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

CHILD = Path(__file__).resolve().parent / "ort_child.py"


class OrtRefused(Exception):  # noqa: N818  (what the backend said, as the test reads it)
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def build_archive(
    python: Path, *, onnx: bytes, spec: Any, trainable: list[str], folder: Path
) -> tuple[bytes | None, dict[str, Any]]:
    """The ``ort_training`` archive of an ONNX graph (None when not trainable) and the builder's answer."""
    from devices_agent.ort_artifacts import pack
    from models_registry.ml.ort_env import build_artifacts

    answer = build_artifacts(
        python=python,
        onnx=onnx,
        out=folder,
        task=spec.task,
        trainable=trainable,
        input_shape=list(spec.input_shape),
        input_dtype=spec.input_dtype,
        outputs=spec.outputs,
    )
    return (pack(folder, answer["manifest"]) if answer["ok"] else None), answer


def run_ort(
    board: Any,
    *,
    archive: bytes,
    state: dict[str, np.ndarray],
    spec: Any,
    x: np.ndarray,
    y: np.ndarray,
    config: Any = None,
    trainable: list[str] | None = None,
    folder: Path,
    command: str = "train",
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train (or evaluate) with the ort backend in the board's environment: ``(delta, metrics)``."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"x": x, "y": y, **{f"w/{k}": v for k, v in state.items()}}
    np.savez(folder / "in.npz", **arrays)
    (folder / "archive.tar.gz").write_bytes(archive)
    request = {"spec": spec.to_dict(), "config": asdict(config) if config else {}, "trainable": trainable}
    (folder / "request.json").write_text(json.dumps(request))
    done = board.run(
        "-P",
        str(CHILD),
        command,
        str(folder / "in.npz"),
        str(folder / "archive.tar.gz"),
        str(folder / "request.json"),
        str(folder / "out.npz"),
        cwd=folder,
        timeout=300,
    )
    if done.returncode == 3:
        refused = json.loads(done.stderr.strip().splitlines()[-1])
        raise OrtRefused(refused["code"], refused["message"])
    assert done.returncode == 0, done.stderr[-3000:]
    out = np.load(folder / "out.npz")
    delta = {k[2:]: out[k] for k in out.files if k.startswith("d/")}
    return delta, json.loads(str(out["metrics"]))
