"""On-device learning: a federated client's local training, evaluation and personalisation.

Everything here runs on the board, so it is small and careful with the CPU: torch is
imported inside the functions, and each call runs with one intra-op thread by default
(many simulated devices share two cores; pass ``num_threads`` to change it). The thread
count is restored afterwards. Every function is deterministic for its ``seed``.

Weights come in and go out as ``dict[str, np.ndarray]`` of float32 keyed by the names of
:mod:`devices_agent.nets`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from devices_agent.codecs import clip_by_norm, l2_norm
from devices_agent.nets import (
    ARCHS,
    build_model_for_state,
    head_parameter_names,
    load_numpy_state,
    state_to_numpy,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "LocalResult",
    "apply_delta",
    "evaluate_numpy",
    "personalise_head",
    "rebase_head",
    "torch_threads",
    "train_local",
]

Weights = dict[str, npt.NDArray[np.float32]]
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class LocalResult:
    """What one round of local training produced.

    ``delta`` is ``new - global`` per parameter (float32), already clipped when a
    ``clip_norm`` was given. ``metrics`` holds ``initial_loss`` (the global model on the
    local data), ``train_loss`` and ``train_accuracy`` (the trained model on the local
    data), ``delta_norm`` (before clipping), ``clip_scale``, ``steps`` and ``stopped``
    (1.0 when ``should_stop`` cut training short).
    """

    delta: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the body with torch's intra-op thread count set to ``num_threads``, then restore it.

    ``None`` leaves the count alone.
    """
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


def _check_data(
    arch: str, x: npt.ArrayLike, y: npt.ArrayLike
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    info = ARCHS[arch]
    xs = np.asarray(x, dtype=np.float32)
    ys = np.asarray(y)
    expected = (xs.shape[0], *info["input_shape"]) if xs.ndim >= 1 else None
    if xs.ndim < 1 or tuple(xs.shape) != expected:
        raise ValueError(f"x must have shape (N, {info['input_shape']}), got {xs.shape}")
    if ys.shape != (xs.shape[0],):
        raise ValueError(f"y must have shape ({xs.shape[0]},), got {ys.shape}")
    if len(ys) == 0:
        raise ValueError("no examples to train or evaluate on")
    if not np.issubdtype(ys.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {ys.dtype}")
    if ys.min() < 0 or ys.max() >= info["num_classes"]:
        raise ValueError(f"labels must lie in [0, {info['num_classes']})")
    if not np.all(np.isfinite(xs)):
        raise ValueError("x holds NaN or Inf")
    return xs, ys.astype(np.int64)


def _make_optimizer(
    params: list[torch.nn.Parameter], *, optimizer: str, lr: float, momentum: float
) -> torch.optim.Optimizer:
    import torch

    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def _loss_and_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = float(torch.nn.functional.cross_entropy(logits, y))
        accuracy = float((logits.argmax(dim=1) == y).double().mean())
    return loss, accuracy


def train_local(
    *,
    arch: str,
    global_weights: Mapping[str, npt.ArrayLike],
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    prox_mu: float = 0.0,
    seed: int,
    clip_norm: float | None = None,
    should_stop: Callable[[], bool] | None = None,
    num_threads: int | None = 1,
) -> LocalResult:
    """Train ``arch`` from ``global_weights`` on local ``(x, y)`` and return the update.

    Mini-batch training with cross-entropy, shuffled by ``seed``. With ``prox_mu > 0`` the
    FedProx proximal term ``(mu / 2) * ||w - w_global||^2`` is added to each batch's loss,
    which keeps heterogeneous clients from drifting far from the global model.
    ``should_stop`` is polled before every batch; when it returns True, training ends and
    the update so far is returned with ``metrics["stopped"] = 1.0``. With ``clip_norm``
    the whole delta is scaled to an L2 norm of at most ``clip_norm``.

    Raises ``ValueError`` for bad arguments or data, and when training diverges (a
    non-finite loss or delta).
    """
    import torch

    xs, ys = _check_data(arch, x, y)
    if epochs < 0 or batch_size < 1 or not lr > 0 or prox_mu < 0 or momentum < 0:
        raise ValueError("epochs >= 0, batch_size >= 1, lr > 0, prox_mu >= 0, momentum >= 0")
    with torch_threads(num_threads):
        model = build_model_for_state(arch, global_weights)
        anchors = [p.detach().clone() for p in model.parameters()]
        params = list(model.parameters())
        opt = _make_optimizer(params, optimizer=optimizer, lr=lr, momentum=momentum)
        x_t = torch.from_numpy(xs)
        y_t = torch.from_numpy(ys)
        initial_loss, _ = _loss_and_accuracy(model, x_t, y_t)
        generator = torch.Generator().manual_seed(seed)
        steps = 0
        stopped = False
        for _ in range(epochs):
            model.train()
            order = torch.randperm(len(ys), generator=generator)
            for start in range(0, len(ys), batch_size):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                batch = order[start : start + batch_size]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x_t[batch]), y_t[batch])
                if prox_mu > 0:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors, strict=True))
                    loss = loss + (prox_mu / 2.0) * prox
                if not torch.isfinite(loss):
                    raise ValueError(f"training diverged at step {steps} (loss {loss.item()})")
                loss.backward()
                opt.step()
                steps += 1
            if stopped:
                break
        train_loss, train_accuracy = _loss_and_accuracy(model, x_t, y_t)
        new = state_to_numpy(model)
    delta = {
        name: (new[name].astype(np.float64) - np.asarray(global_weights[name], np.float64)).astype(np.float32)
        for name in new
    }
    norm = l2_norm(delta)
    if not math.isfinite(norm):
        raise ValueError("training produced a non-finite update")
    scale = 1.0
    if clip_norm is not None:
        delta, scale = clip_by_norm(delta, max_norm=clip_norm)
    metrics = {
        "initial_loss": initial_loss,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "delta_norm": norm,
        "clip_scale": scale,
        "steps": float(steps),
        "stopped": 1.0 if stopped else 0.0,
    }
    return LocalResult(delta=delta, num_examples=len(ys), metrics=metrics)


def apply_delta(weights: Mapping[str, npt.ArrayLike], delta: Mapping[str, npt.ArrayLike]) -> Weights:
    """Return ``weights + delta`` as float32 (names must match)."""
    if set(weights) != set(delta):
        raise ValueError("weights and delta have different parameter names")
    return {
        name: (np.asarray(weights[name], np.float64) + np.asarray(delta[name], np.float64)).astype(np.float32)
        for name in weights
    }


def evaluate_numpy(
    *,
    arch: str,
    weights: Mapping[str, npt.ArrayLike],
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    num_threads: int | None = 1,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``arch`` with ``weights`` on ``(x, y)``, in torch."""
    import torch

    xs, ys = _check_data(arch, x, y)
    with torch_threads(num_threads):
        model = build_model_for_state(arch, weights)
        return _loss_and_accuracy(model, torch.from_numpy(xs), torch.from_numpy(ys))


def _head_fits(arch: str, base: Mapping[str, npt.ArrayLike], head: Mapping[str, npt.ArrayLike]) -> bool:
    for name in head_parameter_names(arch):
        if name not in head or name not in base:
            return False
        array = np.asarray(head[name])
        if array.shape != np.shape(base[name]) or not np.all(np.isfinite(array)):
            return False
    return True


def personalise_head(
    *,
    arch: str,
    global_weights: Mapping[str, npt.ArrayLike],
    head_weights: Mapping[str, npt.ArrayLike] | None,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    epochs: int,
    lr: float,
    seed: int,
    holdout_fraction: float = 0.25,
    batch_size: int = 32,
    num_threads: int | None = 1,
) -> tuple[Weights, float, float]:
    """Fine-tune only the last layer on local data; return ``(head, global_acc, personal_acc)``.

    The local data is split (by ``seed``) into a training part and a held-out part of
    ``holdout_fraction``; both accuracies are measured on the held-out part, so they say
    whether the personal head helps on data it has not seen. Training starts from
    ``head_weights`` when they fit the global model (see :func:`rebase_head`), otherwise
    from the global head. The body stays frozen at ``global_weights``.
    """
    import torch

    xs, ys = _check_data(arch, x, y)
    if len(ys) < 2:
        raise ValueError("personalisation needs at least two local examples")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError("holdout_fraction must be in (0, 1)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ys))
    n_hold = min(len(ys) - 1, max(1, round(len(ys) * holdout_fraction)))
    hold, fit = order[:n_hold], order[n_hold:]
    head_names = head_parameter_names(arch)
    with torch_threads(num_threads):
        model = build_model_for_state(arch, global_weights)
        x_hold = torch.from_numpy(xs[hold])
        y_hold = torch.from_numpy(ys[hold])
        _, global_acc = _loss_and_accuracy(model, x_hold, y_hold)
        if head_weights is not None and _head_fits(arch, global_weights, head_weights):
            start = {n: np.asarray(v, np.float32) for n, v in global_weights.items()}
            start.update({n: np.asarray(head_weights[n], np.float32) for n in head_names})
            load_numpy_state(model, start)
        named = dict(model.named_parameters())
        for name, param in named.items():
            param.requires_grad_(name in head_names)
        opt = torch.optim.SGD([named[n] for n in head_names], lr=lr, momentum=0.9)
        x_fit = torch.from_numpy(xs[fit])
        y_fit = torch.from_numpy(ys[fit])
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            model.train()
            perm = torch.randperm(len(fit), generator=generator)
            for begin in range(0, len(fit), batch_size):
                batch = perm[begin : begin + batch_size]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x_fit[batch]), y_fit[batch])
                loss.backward()
                opt.step()
        _, personal_acc = _loss_and_accuracy(model, x_hold, y_hold)
        state = state_to_numpy(model)
    head = {name: state[name] for name in head_names}
    if not all(np.all(np.isfinite(v)) for v in head.values()):
        raise ValueError("personalisation diverged (non-finite head)")
    return head, global_acc, personal_acc


def rebase_head(
    *,
    arch: str,
    new_global: Mapping[str, npt.ArrayLike],
    head_weights: Mapping[str, npt.ArrayLike] | None,
) -> tuple[Weights | None, str]:
    """Decide whether a personal head still fits a new global model.

    Returns ``(head, "kept")`` when every head parameter exists in ``new_global`` with the
    same shape (the head is returned as float32 copies), and ``(None, "reset")`` when
    there is no head or it no longer fits (for example the new version has a different
    hidden width), in which case the device uses the global head until it personalises
    again.
    """
    if head_weights is None or not _head_fits(arch, new_global, head_weights):
        return None, "reset"
    names = head_parameter_names(arch)
    return {n: np.array(head_weights[n], dtype=np.float32, copy=True) for n in names}, "kept"
