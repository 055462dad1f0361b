"""The backend interface: what a round asks for, what training answers, and the protocol.

Kept apart from the package so the backends import it without importing the package that
chooses between them (which imports them in turn).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from devices_agent.family import FamilySpec

__all__ = ["OPTIMIZERS", "Backend", "LocalResult", "TrainConfig", "Weights"]

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
