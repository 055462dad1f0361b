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
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from devices_agent.family import FamilySpec

__all__ = [
    "Backend",
    "LocalResult",
    "TrainConfig",
    "available_backends",
    "get_backend",
]

Weights = dict[str, npt.NDArray[np.float32]]
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainConfig:
    """How a round asks a board to train (the ``train`` part of the round task)."""

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    prox_mu: float = 0.0
    momentum: float = 0.0
    clip_norm: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.batch_size < 1 or not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError("epochs >= 0, batch_size >= 1 and a finite lr > 0 are required")
        if self.prox_mu < 0 or self.momentum < 0:
            raise ValueError("prox_mu and momentum must be >= 0")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")


@dataclass(frozen=True)
class LocalResult:
    """What one round of local training produced.

    ``delta`` is ``new - global`` per trainable parameter (float32), clipped when the
    round asked. ``metrics`` holds ``initial_loss`` (the global model on the local data),
    ``train_loss``, the task's metric on the local data, ``delta_norm`` (before
    clipping), ``clip_scale``, ``steps``, and ``stopped`` (1.0 when training was cut short).
    """

    delta: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    """A training runtime (see the package docstring)."""

    name: str
    # The round task's key of the artifact the backend trains from ("program", "ort_training").
    artifact: str

    def train(
        self,
        *,
        program: bytes,
        state: Mapping[str, npt.ArrayLike],
        spec: FamilySpec,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
        config: TrainConfig,
        trainable: list[str] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> LocalResult:
        """Train from ``state`` on ``(x, y)``; the delta of ``trainable`` (default: all parameters)."""
        ...

    def evaluate(
        self,
        *,
        program: bytes,
        state: Mapping[str, npt.ArrayLike],
        spec: FamilySpec,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
    ) -> dict[str, Any]:
        """The task's metrics of the model on ``(x, y)``."""
        ...


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
