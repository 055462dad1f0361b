from __future__ import annotations

from typing import Any

import pytest

from tests.bundles import digits_bundle


@pytest.fixture(scope="session")
def mlp(trained_bundle: Any) -> Any:
    """The trained digits MLP bundle (program, weights, ONNX)."""
    return trained_bundle


@pytest.fixture(scope="session")
def cnn() -> Any:
    """The trained digits CNN bundle."""
    return digits_bundle("cnn", trained=True)


@pytest.fixture(scope="session")
def small() -> Any:
    """The small digits MLP with initial weights: a distillation student."""
    return digits_bundle("mlp_small")
