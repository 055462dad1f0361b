"""The PyTorch backend: train a version's program on the board's data, with autograd.

The program is rebuilt from its JSON and the global weights without pickle
(:func:`devices_agent.program.load_program`). Training is mini-batch with the task's loss
(:func:`devices_agent.family.torch_loss`), shuffled by the round's seed, optionally with
the FedProx proximal term, and runs with one intra-op thread by default: boards are small
and share their cores with the rest of the agent (the count is restored afterwards).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.backends.base import LocalResult, TrainConfig, Weights
from devices_agent.codecs import clip_by_norm, l2_norm
from devices_agent.family import FamilySpec, outputs_metrics, torch_loss
from devices_agent.program import load_program

__all__ = ["TorchBackend", "torch_threads"]


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the body with torch's intra-op thread count set to ``num_threads``, then restore it."""
    import torch

    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _targets(spec: FamilySpec, y: npt.NDArray[Any]) -> Any:
    import torch

    if spec.task == "classification":
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32).reshape(len(y), -1))


class TorchBackend:
    """Trains and evaluates programs with PyTorch (see the module docstring)."""

    name = "torch"
    artifact = "program"

    def __init__(self, *, num_threads: int | None = 1) -> None:
        self.num_threads = num_threads

    def _outputs(self, module: Any, x: npt.NDArray[Any], batch: int = 1024) -> npt.NDArray[np.float64]:
        import torch

        parts = []
        with torch.no_grad():
            for start in range(0, len(x), batch):
                chunk = torch.from_numpy(np.ascontiguousarray(x[start : start + batch]))
                parts.append(module(chunk).detach().numpy().astype(np.float64))
        return np.concatenate(parts) if parts else np.zeros((0, 1))

    def evaluate(
        self,
        *,
        program: bytes,
        state: Mapping[str, npt.ArrayLike],
        spec: FamilySpec,
        x: npt.NDArray[Any],
        y: npt.NDArray[Any],
    ) -> dict[str, Any]:
        """The task's metrics of the model on ``(x, y)`` (see :mod:`devices_agent.family`)."""
        x = spec.inputs(x)
        y = spec.labels(y, count=len(x))
        with torch_threads(self.num_threads):
            module = load_program(program, state, input_shape=spec.input_shape, input_dtype=spec.input_dtype)
            return outputs_metrics(spec, self._outputs(module, x), y)

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
        """Train from ``state`` on ``(x, y)`` and return the update of ``trainable`` parameters.

        ``trainable`` limits what is trained (personalisation trains the head only); the
        rest is frozen. ``should_stop`` is polled before every batch: when it returns True
        training ends and the update so far is returned with ``metrics["stopped"] = 1``.
        Raises ``ValueError`` for data that does not fit and when training diverges.
        """
        import torch

        if len(x) == 0:
            raise ValueError("no examples to train on")
        x = spec.inputs(x)  # SpecError (a ValueError) says what does not fit
        y = spec.labels(y, count=len(x))
        loss_fn = torch_loss(spec)
        with torch_threads(self.num_threads):
            module = load_program(program, state, input_shape=spec.input_shape, input_dtype=spec.input_dtype)
            named = dict(module.named_parameters())
            chosen = list(named) if trainable is None else list(trainable)
            unknown = [n for n in chosen if n not in named]
            if unknown:
                raise ValueError(f"not parameters of the program: {unknown}")
            for name, param in named.items():
                param.requires_grad_(name in chosen)
            params = [named[n] for n in chosen]
            anchors = [p.detach().clone() for p in params]
            if config.optimizer == "sgd":
                opt: Any = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
            else:
                opt = torch.optim.Adam(params, lr=config.lr)
            x_t = torch.from_numpy(np.ascontiguousarray(x))
            y_t = _targets(spec, y)
            with torch.no_grad():
                initial_loss = float(loss_fn(module(x_t), y_t))
            generator = torch.Generator().manual_seed(int(config.seed))
            steps = 0
            stopped = False
            for _ in range(config.epochs):
                order = torch.randperm(len(y_t), generator=generator)
                for start in range(0, len(y_t), config.batch_size):
                    if should_stop is not None and should_stop():
                        stopped = True
                        break
                    batch = order[start : start + config.batch_size]
                    opt.zero_grad()
                    loss = loss_fn(module(x_t[batch]), y_t[batch])
                    if config.prox_mu > 0:
                        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                        loss = loss + (config.prox_mu / 2.0) * prox
                    if not torch.isfinite(loss):
                        raise ValueError(f"training diverged at step {steps} (loss {loss.item()})")
                    loss.backward()
                    opt.step()
                    steps += 1
                if stopped:
                    break
            new = {n: named[n].detach().numpy().astype(np.float32, copy=True) for n in chosen}
            local = outputs_metrics(spec, self._outputs(module, x), y)
        delta: Weights = {
            name: (new[name].astype(np.float64) - np.asarray(state[name], np.float64)).astype(np.float32)
            for name in chosen
        }
        norm = l2_norm(delta)
        if not math.isfinite(norm):
            raise ValueError("training produced a non-finite update")
        scale = 1.0
        if config.clip_norm is not None:
            delta, scale = clip_by_norm(delta, max_norm=config.clip_norm)
        metrics: dict[str, float] = {
            "initial_loss": initial_loss,
            "train_loss": float(local["loss"]),
            f"train_{spec.primary_metric}": float(local[spec.primary_metric]),
            "delta_norm": norm,
            "clip_scale": scale,
            "steps": float(steps),
            "stopped": 1.0 if stopped else 0.0,
        }
        return LocalResult(delta=delta, num_examples=len(y), metrics=metrics)
