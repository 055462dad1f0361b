from __future__ import annotations

import numpy as np
import pytest
from devices_agent.local_train import apply_delta, train_local

from config.demo.nets import initial_weights
from devices_agent.data import load_digits_split

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return load_digits_split(seed=0)


def _train(arch: str, digits: Digits, epochs: int) -> dict[str, np.ndarray]:
    x, y, _, _ = digits
    start = initial_weights(arch, seed=0)
    result = train_local(
        arch=arch,
        global_weights=start,
        x=x,
        y=y,
        epochs=epochs,
        batch_size=32,
        lr=0.005,
        optimizer="adam",
        seed=0,
    )
    return apply_delta(start, result.delta)


@pytest.fixture(scope="session")
def trained_mlp(digits: Digits) -> dict[str, np.ndarray]:
    return _train("mlp", digits, epochs=8)


@pytest.fixture(scope="session")
def trained_cnn(digits: Digits) -> dict[str, np.ndarray]:
    return _train("cnn", digits, epochs=4)
