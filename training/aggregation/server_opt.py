"""Server optimisers on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated
Optimization"): FedAdam and FedYogi.

The pseudo-gradient is the weighted mean client delta Delta_t (the direction the clients
moved). With server learning rate eta, momentum beta1, second-moment decay beta2 and
adaptivity tau:

    m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
    v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2                        (FedAdam)
    v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)    (FedYogi)
    x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)

As in the paper there is no bias correction, and v starts at tau^2 (the paper asks for
v_{-1} >= tau^2). The state (m, v, step) lives across rounds; it is stored as float32
arrays and the update is computed in float64.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .base import UpdateSource, Weights, as_float32, check_update, shapes_of
from .mean import WeightedMeanAggregator
from .privacy import Privacy

STATE_VERSION = "1"


@dataclass
class ServerOptState:
    """Optimiser state carried from round to round."""

    m: Weights
    v: Weights
    step: int = 0


def state_to_bytes(state: ServerOptState) -> bytes:
    """Serialise optimiser state to safetensors bytes."""
    arrays = {f"m::{k}": a for k, a in state.m.items()}
    arrays.update({f"v::{k}": a for k, a in state.v.items()})
    meta = {"kind": "server_opt_state", "version": STATE_VERSION, "step": str(state.step)}
    data: bytes = st_save(arrays, metadata=meta)
    return data


def state_from_bytes(data: bytes) -> ServerOptState:
    """Load optimiser state saved with :func:`state_to_bytes`."""
    arrays = st_load(data)
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    if meta.get("kind") != "server_opt_state" or meta.get("version") != STATE_VERSION:
        raise ValueError("not a server optimiser state")
    m = {k[3:]: np.asarray(a, dtype=np.float32) for k, a in arrays.items() if k.startswith("m::")}
    v = {k[3:]: np.asarray(a, dtype=np.float32) for k, a in arrays.items() if k.startswith("v::")}
    if set(m) != set(v) or len(m) + len(v) != len(arrays):
        raise ValueError("optimiser state must hold matching m:: and v:: tensors")
    return ServerOptState(m=m, v=v, step=int(meta["step"]))


class FedAdam:
    """Adam on the server over the pseudo-gradient (Reddi et al. 2021, Algorithm 2)."""

    name = "fedadam"

    def __init__(
        self, *, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        if not (eta > 0 and 0 <= beta1 < 1 and 0 <= beta2 < 1 and tau > 0):
            raise ValueError("need eta > 0, 0 <= beta1 < 1, 0 <= beta2 < 1, tau > 0")
        self.eta = eta
        self.beta1 = beta1
        self.beta2 = beta2
        self.tau = tau

    def init_state(self, global_weights: Mapping[str, npt.ArrayLike]) -> ServerOptState:
        """Fresh state: m = 0, v = tau^2."""
        shapes = shapes_of(global_weights)
        return ServerOptState(
            m={k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()},
            v={k: np.full(s, self.tau**2, dtype=np.float32) for k, s in shapes.items()},
            step=0,
        )

    def _second_moment(
        self, v: npt.NDArray[np.float64], g2: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        return self.beta2 * v + (1.0 - self.beta2) * g2

    def step(
        self,
        *,
        global_weights: Mapping[str, npt.ArrayLike],
        pseudo_gradient: Mapping[str, npt.ArrayLike],
        state: ServerOptState,
    ) -> tuple[Weights, ServerOptState]:
        """Apply one server step; returns ``(new_weights, new_state)``.

        The input state is not modified.
        """
        shapes = shapes_of(global_weights)
        check_update(pseudo_gradient, shapes)
        check_update(state.m, shapes)
        check_update(state.v, shapes)
        new_weights: Weights = {}
        m_new: Weights = {}
        v_new: Weights = {}
        for name in shapes:
            g = np.asarray(pseudo_gradient[name], dtype=np.float64)
            m = self.beta1 * np.asarray(state.m[name], dtype=np.float64) + (1 - self.beta1) * g
            v = self._second_moment(np.asarray(state.v[name], dtype=np.float64), g * g)
            x = np.asarray(global_weights[name], dtype=np.float64)
            new_weights[name] = (x + self.eta * m / (np.sqrt(v) + self.tau)).astype(np.float32)
            m_new[name] = m.astype(np.float32)
            v_new[name] = v.astype(np.float32)
        return new_weights, ServerOptState(m=m_new, v=v_new, step=state.step + 1)


class FedYogi(FedAdam):
    """Yogi on the server: the second moment moves additively, by sign, which keeps
    v from growing too fast when a few rounds have large deltas."""

    name = "fedyogi"

    def _second_moment(
        self, v: npt.NDArray[np.float64], g2: npt.NDArray[np.float64]
    ) -> npt.NDArray[np.float64]:
        return np.asarray(v - (1.0 - self.beta2) * g2 * np.sign(v - g2), dtype=np.float64)


class ServerOptAggregator:
    """Weighted mean of deltas followed by a server optimiser step.

    Accepting, merging and checkpoints are those of :class:`WeightedMeanAggregator`
    (partials from ``partial_from_bytes`` can be merged in directly), and so is the
    privacy transform: the optimiser steps on the noised mean delta. ``finalize``
    applies the optimiser and leaves the new state in :attr:`state`, which
    :meth:`state_bytes` hands to the caller to persist until the next round.
    """

    mergeable = True

    def __init__(
        self,
        *,
        global_weights: Mapping[str, npt.ArrayLike],
        optimizer: FedAdam,
        state: ServerOptState | None = None,
        privacy: Privacy | None = None,
    ) -> None:
        self.name = optimizer.name
        self.optimizer = optimizer
        self.mean = WeightedMeanAggregator(global_weights=global_weights, privacy=privacy)
        self.state = self._checked(state if state is not None else optimizer.init_state(global_weights))

    def _checked(self, state: ServerOptState) -> ServerOptState:
        check_update(state.m, self.mean.shapes)
        check_update(state.v, self.mean.shapes)
        return state

    @property
    def num_accepted(self) -> int:
        """How many updates were added."""
        return self.mean.num_accepted

    @property
    def accepted_ids(self) -> set[str]:
        """Ids of the updates already counted."""
        return self.mean.accepted_ids

    def accept(
        self,
        update: Mapping[str, npt.ArrayLike],
        *,
        weight: float = 1.0,
        update_id: str | None = None,
    ) -> bool:
        """Add one validated delta; see :meth:`WeightedMeanAggregator.accept`."""
        return self.mean.accept(update, weight=weight, update_id=update_id)

    def merge(self, other: object) -> None:
        """Fold in another partial (of this kind, or a plain weighted-mean partial)."""
        self.mean.merge(other.mean if isinstance(other, ServerOptAggregator) else other)

    def checkpoint(self) -> bytes:
        """The running mean's checkpoint (the optimiser state only changes in ``finalize``)."""
        return self.mean.checkpoint()

    def resume(self, data: bytes) -> None:
        """Fold in a :meth:`checkpoint` of the same round."""
        self.mean.resume(data)

    def finalize(self) -> Weights:
        """New global weights after one optimiser step; updates :attr:`state`."""
        new_weights, self.state = self.optimizer.step(
            global_weights=self.mean.global_weights,
            pseudo_gradient=self.mean.pseudo_gradient(),
            state=self.state,
        )
        return as_float32(new_weights)

    def finalize_source(self, source: UpdateSource) -> Weights:
        """Not for a mean: it streams whole updates through :meth:`accept`."""
        raise TypeError(f"{self.name} is mergeable: accept() the updates one by one, then finalize()")

    def state_bytes(self) -> bytes | None:
        """The optimiser state (moments and step) to carry into the next round."""
        return state_to_bytes(self.state)

    def load_state(self, data: bytes) -> None:
        """Continue from the state of the previous round (it must fit this model)."""
        self.state = self._checked(state_from_bytes(data))
