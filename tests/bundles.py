"""Registered model versions for tests: the demo's digits nets as upload bundles.

A bundle (program, weights, ONNX) is what every version boards can train carries; making
one takes a second or two (torch.export and the ONNX export), so they are cached per
architecture and weights seed for the whole run.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np


@functools.cache
def digits_bundle(arch: str = "mlp", *, seed: int = 0, trained: bool = False) -> Any:
    """The bundle of a digits net: seeded initial weights, or briefly trained on 300 examples."""
    from config.demo.nets import bundle, initial_weights
    from config.demo.seed import demo_train_weights

    weights = (
        demo_train_weights(arch=arch, epochs=15, seed=seed) if trained else initial_weights(arch, seed=seed)
    )
    return bundle(arch, weights)


def digits_weights(arch: str = "mlp", *, seed: int = 0, trained: bool = False) -> dict[str, np.ndarray]:
    """The bundle's weights as arrays, by parameter name."""
    from devices_agent.codecs import decode_tensors

    tensors, _ = decode_tensors(digits_bundle(arch, seed=seed, trained=trained).weights)
    return {k: np.asarray(v) for k, v in tensors.items()}


def digits_family(name: str = "digits-test-family", *, arch: str = "mlp") -> Any:
    """A digits family (created once per test database)."""
    from config.demo.nets import spec_fields
    from models_registry.models import ModelFamily
    from models_registry.services import family_create

    return ModelFamily.objects.filter(name=name).first() or family_create(
        name=name, arch=arch, **spec_fields(arch)
    )


def digits_version(
    family: Any = None, *, arch: str = "mlp", seed: int = 0, trained: bool = False, **fields: Any
) -> Any:
    """A registered version of a digits net with all three artifacts (in ``draft`` unless promoted)."""
    from models_registry.services import version_create

    made = digits_bundle(arch, seed=seed, trained=trained)
    return version_create(
        family=family or digits_family(arch=arch),
        weights=made.weights,
        onnx=made.onnx,
        program=made.program,
        head=made.head,
        arch=arch,
        **fields,
    )


# A small regression model: 8 sensor readings -> one value (8 -> 16 -> 1 with ReLU).
REGRESSION_INPUT = 8


@functools.cache
def regression_bundle(*, seed: int = 0) -> Any:
    """The bundle of a small regression net with seeded initial weights."""
    import torch

    from devices_agent.program import make_bundle

    class Regressor(torch.nn.Module):  # type: ignore[misc, unused-ignore]
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.nn.Linear(REGRESSION_INPUT, 16)
            self.out = torch.nn.Linear(16, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.relu(self.hidden(x)))  # type: ignore[no-any-return, unused-ignore]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Regressor()
    return make_bundle(model, torch.zeros((2, REGRESSION_INPUT)), head=["out.weight", "out.bias"])


def regression_family(name: str = "sensor-regression") -> Any:
    """A regression family (8 float inputs, one output), created once per test database."""
    from models_registry.models import ModelFamily
    from models_registry.services import family_create

    return ModelFamily.objects.filter(name=name).first() or family_create(
        name=name, arch="mlp", task="regression", input_shape=[REGRESSION_INPUT], output_size=1
    )


def regression_version(family: Any = None, *, seed: int = 0, **fields: Any) -> Any:
    """A registered version of the regression net with all three artifacts (in ``draft``)."""
    from models_registry.services import version_create

    made = regression_bundle(seed=seed)
    return version_create(
        family=family or regression_family(),
        weights=made.weights,
        onnx=made.onnx,
        program=made.program,
        head=made.head,
        arch="mlp",
        **fields,
    )
