"""The demo data set: scikit-learn's bundled digits, split and partitioned over devices.

Nothing is downloaded: ``load_digits`` ships inside scikit-learn. Every function here is
deterministic for a seed, so a simulated device that restarts sees the same local data.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

__all__ = [
    "NUM_CLASSES",
    "NUM_FEATURES",
    "client_dataset",
    "dirichlet_partition",
    "load_digits_split",
]

NUM_FEATURES = 64
NUM_CLASSES = 10

Features = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


@lru_cache(maxsize=8)
def _split(seed: int, test_size: float) -> tuple[Features, Labels, Features, Labels]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Pixels are 0..16 counts; dividing by 16 maps them exactly onto [0, 1].
    x = (np.asarray(digits.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(digits.target, dtype=np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=seed, stratify=y
    )
    for array in (x_train, y_train, x_test, y_test):
        array.setflags(write=False)
    return x_train, y_train, x_test, y_test


def load_digits_split(*, seed: int = 0, test_size: float = 0.2) -> tuple[Features, Labels, Features, Labels]:
    """Return ``(x_train, y_train, x_test, y_test)`` from scikit-learn's digits.

    The split is stratified over the ten labels and fixed by ``seed``. Features are the
    64 pixels scaled to [0, 1] as float32; labels are int64 in 0..9. The arrays are fresh
    copies, so callers may modify them.
    """
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    x_train, y_train, x_test, y_test = _split(seed, test_size)
    return x_train.copy(), y_train.copy(), x_test.copy(), y_test.copy()


def dirichlet_partition(
    labels: npt.ArrayLike,
    *,
    n_clients: int,
    alpha: float,
    seed: int,
    min_examples: int = 5,
    max_attempts: int = 100,
) -> list[npt.NDArray[np.int64]]:
    """Split example indices over ``n_clients`` with label proportions drawn from Dirichlet(alpha).

    The usual non-IID benchmark split: for every label, the share each client receives is
    drawn from a symmetric Dirichlet distribution, so a small ``alpha`` (0.1) gives each
    client a few dominant labels and a large one (100) approaches an IID split. Every
    index appears in exactly one client's array, each array sorted; every client gets at
    least ``min_examples`` examples (redrawn, then topped up from the largest clients when
    the draw keeps leaving someone short). Deterministic for a ``seed``.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if n_clients < 1:
        raise ValueError("n_clients must be at least 1")
    if not alpha > 0:
        raise ValueError("alpha must be positive")
    if n_clients * min_examples > len(y):
        raise ValueError(f"{len(y)} examples cannot give {n_clients} clients {min_examples} examples each")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    parts: list[list[int]] = []
    for _ in range(max_attempts):
        parts = [[] for _ in range(n_clients)]
        for label in classes:
            members = np.flatnonzero(y == label)
            rng.shuffle(members)
            shares = rng.dirichlet(np.full(n_clients, alpha))
            # Cumulative cut points turn the shares into contiguous slices of the shuffled
            # members, so every member lands in exactly one client.
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(int(i) for i in chunk)
        if min(len(p) for p in parts) >= min_examples:
            break
    else:
        # Very small alpha with many clients can keep leaving someone nearly empty; move
        # random examples from the largest clients rather than loop forever.
        for client in range(n_clients):
            while len(parts[client]) < min_examples:
                donor = max(range(n_clients), key=lambda c: len(parts[c]))
                taken = parts[donor].pop(int(rng.integers(len(parts[donor]))))
                parts[client].append(taken)
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def client_dataset(
    *, client_index: int, n_clients: int, alpha: float = 0.5, seed: int = 0
) -> tuple[Features, Labels]:
    """Return client ``client_index``'s partition ``(x, y)`` of the digits training split.

    Uses :func:`load_digits_split` with ``seed`` and :func:`dirichlet_partition` with the
    same ``seed``, so every simulated device computes the same partition independently.
    """
    if not 0 <= client_index < n_clients:
        raise ValueError(f"client_index must be in [0, {n_clients}), got {client_index}")
    x_train, y_train, _, _ = _split(seed, 0.2)
    parts = _partition(seed, n_clients, alpha)
    index = parts[client_index]
    return x_train[index].copy(), y_train[index].copy()


@lru_cache(maxsize=32)
def _partition(seed: int, n_clients: int, alpha: float) -> tuple[npt.NDArray[np.int64], ...]:
    _, y_train, _, _ = _split(seed, 0.2)
    return tuple(dirichlet_partition(y_train, n_clients=n_clients, alpha=alpha, seed=seed))
