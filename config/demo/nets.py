"""The demo's own models, written as any user would write theirs: plain ``nn.Module`` s.

Nothing in the product knows these architectures. The demo builds them here, trains
them briefly, and turns each into an upload bundle (program, weights, ONNX) with
:func:`devices_agent.program.make_bundle`, exactly what a team does with its own model;
from then on the registry, the rounds and the boards know only the artifacts.

* ``mlp``: digits, 64 -> 64 -> 64 -> 10 with ReLU; ``fc1.*``, ``fc2.*``, ``fc3.*``.
* ``mlp_small``: digits, 64 -> 32 -> 10 with ReLU (a distillation student).
* ``cnn``: digits as a 1x8x8 image; two small conv layers and a linear head.
* ``activity``: a 1-D CNN over 3-axis accelerometer windows ``[3, 64]`` -> 6 activities.

Hidden widths may be smaller than the defaults: :func:`build_model` takes them
explicitly and :func:`build_model_for_state` reads them off the weights. torch is
imported only inside the functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch

__all__ = [
    "ARCHS",
    "ArchInfo",
    "build_model",
    "build_model_for_state",
    "head_parameter_names",
    "initial_weights",
    "load_numpy_state",
    "parameter_count",
    "state_to_numpy",
    "widths_of_state",
]

Weights = dict[str, npt.NDArray[np.float32]]


class ArchInfo(TypedDict):
    """What callers need to know about an architecture without building it."""

    input_shape: tuple[int, ...]  # per example, without the batch axis
    num_classes: int
    widths: tuple[int, ...]  # default hidden widths (neurons or channels)
    head: tuple[str, ...]  # parameter names of the last layer
    prunable: tuple[str, ...]  # modules whose outputs structured pruning may remove


ARCHS: dict[str, ArchInfo] = {
    "mlp": {
        "input_shape": (64,),
        "num_classes": 10,
        "widths": (64, 64),
        "head": ("fc3.weight", "fc3.bias"),
        "prunable": ("fc1", "fc2"),
    },
    "mlp_small": {
        "input_shape": (64,),
        "num_classes": 10,
        "widths": (32,),
        "head": ("fc2.weight", "fc2.bias"),
        "prunable": ("fc1",),
    },
    "cnn": {
        "input_shape": (64,),
        "num_classes": 10,
        "widths": (8, 16),
        "head": ("fc.weight", "fc.bias"),
        "prunable": ("conv1", "conv2"),
    },
    "activity": {
        "input_shape": (3, 64),
        "num_classes": 6,
        "widths": (16, 16),
        "head": ("fc.weight", "fc.bias"),
        "prunable": ("conv1", "conv2"),
    },
}

# The CNN's feature map after the pool is 4x4 for every channel of conv2.
_CNN_SPATIAL = 16


def _info(arch: str) -> ArchInfo:
    try:
        return ARCHS[arch]
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(ARCHS)}") from None


@cache
def _classes() -> dict[str, Any]:
    # Built on first use so importing this module never imports torch.
    import torch
    from torch import nn

    class Mlp(nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self, h1: int, h2: int) -> None:
            super().__init__()
            self.fc1 = nn.Linear(64, h1)
            self.fc2 = nn.Linear(h1, h2)
            self.fc3 = nn.Linear(h2, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.fc1(x))
            x = torch.relu(self.fc2(x))
            return self.fc3(x)  # type: ignore[no-any-return, unused-ignore]

    class MlpSmall(nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self, h1: int) -> None:
            super().__init__()
            self.fc1 = nn.Linear(64, h1)
            self.fc2 = nn.Linear(h1, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))  # type: ignore[no-any-return, unused-ignore]

    class Cnn(nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self, c1: int, c2: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, c1, kernel_size=3, padding=1)
            self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
            self.fc = nn.Linear(c2 * _CNN_SPATIAL, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.reshape(-1, 1, 8, 8)
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.relu(self.conv2(x))
            return self.fc(torch.flatten(x, 1))  # type: ignore[no-any-return, unused-ignore]

    class ActivityCnn(nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self, c1: int, c2: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv1d(3, c1, kernel_size=5, padding=2)
            self.conv2 = nn.Conv1d(c1, c2, kernel_size=5, padding=2)
            self.fc = nn.Linear(c2 * 16, 6)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.max_pool1d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool1d(torch.relu(self.conv2(x)), 2)
            return self.fc(torch.flatten(x, 1))  # type: ignore[no-any-return, unused-ignore]

    return {"mlp": Mlp, "mlp_small": MlpSmall, "cnn": Cnn, "activity": ActivityCnn}


def build_model(arch: str, *, widths: tuple[int, ...] | None = None) -> torch.nn.Module:
    """Build a freshly initialised ``arch`` module (see the module docstring for layouts).

    ``widths`` overrides the hidden widths (``(h1, h2)`` for ``mlp``, ``(h1,)`` for
    ``mlp_small``, ``(c1, c2)`` for ``cnn``); initialisation follows torch's global RNG.
    """
    info = _info(arch)
    chosen = info["widths"] if widths is None else tuple(int(w) for w in widths)
    if len(chosen) != len(info["widths"]) or min(chosen) < 1:
        raise ValueError(f"{arch} takes {len(info['widths'])} positive widths, got {widths}")
    module: torch.nn.Module = _classes()[arch](*chosen)
    return module


def widths_of_state(arch: str, state: Mapping[str, npt.ArrayLike]) -> tuple[int, ...]:
    """Read the hidden widths of ``arch`` off a weights dict (first axis of each hidden layer)."""
    info = _info(arch)
    try:
        return tuple(int(np.shape(state[f"{name}.weight"])[0]) for name in info["prunable"])
    except KeyError as exc:
        raise ValueError(f"weights for {arch} lack {exc.args[0]!r}") from None


def build_model_for_state(arch: str, state: Mapping[str, npt.ArrayLike]) -> torch.nn.Module:
    """Build an ``arch`` module shaped like ``state`` and load ``state`` into it.

    The caller's torch RNG is left untouched (the random initialisation is overwritten).
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        model = build_model(arch, widths=widths_of_state(arch, state))
    load_numpy_state(model, state)
    return model


def initial_weights(arch: str, *, seed: int) -> Weights:
    """The starting weights of a new ``arch`` model, deterministic for ``seed``."""
    import torch

    # A private generator state keeps this from disturbing the caller's torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(arch)
    return state_to_numpy(model)


def state_to_numpy(model: torch.nn.Module) -> Weights:
    """Copy a module's state dict into fresh float32 numpy arrays."""
    return {
        name: tensor.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, tensor in model.state_dict().items()
    }


def load_numpy_state(model: torch.nn.Module, state: Mapping[str, npt.ArrayLike]) -> None:
    """Load a numpy weights dict into ``model``; names and shapes must match exactly.

    Raises ``ValueError`` naming the missing, unexpected or mis-shaped parameters.
    """
    import torch

    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    tensors = {}
    for name, target in own.items():
        array = np.asarray(state[name], dtype=np.float32)
        if tuple(array.shape) != tuple(target.shape):
            raise ValueError(f"{name}: expected shape {tuple(target.shape)}, got {tuple(array.shape)}")
        tensors[name] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    model.load_state_dict(tensors, strict=True)


def head_parameter_names(arch: str) -> tuple[str, ...]:
    """Names of the last layer's parameters (the part personalisation fine-tunes)."""
    return _info(arch)["head"]


def parameter_count(state: Mapping[str, npt.ArrayLike]) -> int:
    """Number of scalars in a weights dict."""
    return int(sum(np.size(a) for a in state.values()))


def train_weights(
    arch: str,
    *,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    epochs: int,
    seed: int = 0,
    lr: float = 0.01,
    batch_size: int = 32,
    start: Mapping[str, npt.ArrayLike] | None = None,
) -> Weights:
    """Weights of ``arch`` trained on ``(x, y)`` with Adam and cross-entropy (seeded, one thread)."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model = build_model(arch) if start is None else build_model_for_state(arch, start)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            xs = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            ys = torch.from_numpy(np.asarray(y, dtype=np.int64))
            for _ in range(epochs):
                order = torch.randperm(len(ys))
                for begin in range(0, len(ys), batch_size):
                    batch = order[begin : begin + batch_size]
                    opt.zero_grad()
                    torch.nn.functional.cross_entropy(model(xs[batch]), ys[batch]).backward()
                    opt.step()
        finally:
            torch.set_num_threads(previous)
    return state_to_numpy(model)


def bundle(arch: str, weights: Mapping[str, npt.ArrayLike] | None = None, *, seed: int = 0) -> Any:
    """The upload bundle (program, weights, ONNX) of ``arch`` with ``weights`` (default: initial)."""
    import torch

    from devices_agent.program import make_bundle

    state = initial_weights(arch, seed=seed) if weights is None else weights
    model = build_model_for_state(arch, state)
    example = torch.zeros((2, *ARCHS[arch]["input_shape"]), dtype=torch.float32)
    return make_bundle(model, example, head=list(ARCHS[arch]["head"]))


def spec_fields(arch: str) -> dict[str, Any]:
    """The family contract of an architecture's task (for ``family_create``)."""
    info = ARCHS[arch]
    return {
        "task": "classification",
        "input_shape": list(info["input_shape"]),
        "num_classes": info["num_classes"],
    }
