"""Training runtimes of the agent, behind one interface.

A *backend* trains a model version's program on the board's own data and answers with
the same delta contract whatever runtime it uses: float32 differences keyed by the
program's parameter names, encoded with the round's codec. So one round can mix boards
that train with PyTorch and boards that train with ONNX Runtime.

- ``torch``: :mod:`devices_agent.backends.torch_backend`, the ``torch.export`` program
  loaded without pickle (:mod:`devices_agent.program`).
- ``ort``: :mod:`devices_agent.backends.ort_backend`, ONNX Runtime's on-device training
  from the version's training artifacts (:mod:`devices_agent.ort_artifacts`), for boards
  without PyTorch.

Each backend trains from one artifact of the round task, named by its ``artifact``
attribute (``program`` or ``ort_training``). A board reports the backends it can
actually import in its hardware facts (``training_backends``); the server only selects
it for jobs that accept one of them.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

from devices_agent.backends.base import OPTIMIZERS, Backend, LocalResult, TrainConfig, Weights

__all__ = [
    "OPTIMIZERS",
    "Backend",
    "LocalResult",
    "TrainConfig",
    "Weights",
    "available_backends",
    "get_backend",
]


@functools.cache
def _ort_training_imports() -> bool:
    # A real import: the inference-only onnxruntime has no training API, and a training
    # build that fails to load must not be reported. The agent loads onnxruntime for
    # inference anyway; the training API adds little on top.
    try:
        from devices_agent.backends.ort_backend import training_api

        training_api()
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False
    return True


def available_backends() -> list[str]:
    """The backends this board can train with: torch when it is installed (not imported,
    it is heavy), ort when ONNX Runtime's training API imports."""
    found = []
    if importlib.util.find_spec("torch") is not None:
        found.append("torch")
    if importlib.util.find_spec("onnxruntime") is not None and _ort_training_imports():
        found.append("ort")
    return found


def get_backend(name: str = "torch", **options: Any) -> Backend:
    """The backend named ``name``; ``ValueError`` when this board does not have it."""
    if name == "torch":
        if importlib.util.find_spec("torch") is None:
            raise ValueError("the torch training backend needs PyTorch, which this board does not have")
        from devices_agent.backends.torch_backend import TorchBackend

        return TorchBackend(**options)
    if name == "ort":
        if not _ort_training_imports():
            raise ValueError(
                "the ort training backend needs ONNX Runtime's training build (onnxruntime-training-cpu), "
                "which this board does not have"
            )
        from devices_agent.backends.ort_backend import OrtBackend

        return OrtBackend(**options)
    raise ValueError(f"unknown training backend {name!r}; this board has {available_backends()}")
