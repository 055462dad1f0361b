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
