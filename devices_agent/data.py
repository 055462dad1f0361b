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


# --- the second demo family: activity recognition from a 3-axis accelerometer ----------

ACTIVITIES = ("walking", "running", "sitting", "standing", "upstairs", "downstairs")
ACTIVITY_RATE_HZ = 32
ACTIVITY_WINDOW = 64  # two seconds: the input is [3, 64], one row per axis


def _activity_user(user: int, seed: int) -> dict[str, npt.NDArray[np.float64]]:
    """A person's style: how fast and hard they move, how the board sits on them."""
    rng = np.random.default_rng([seed, 7_919, user])
    # Where the board sits on the body turns gravity and motion between the axes.
    angle = rng.uniform(-1.2, 1.2, size=3)
    cx, cy, cz = np.cos(angle)
    sx, sy, sz = np.sin(angle)
    rotation = (
        np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    )
    return {
        "rotation": rotation,
        "tempo": np.array([rng.uniform(0.75, 1.3)]),
        "vigour": np.array([rng.uniform(0.7, 1.4)]),
        "bias": rng.normal(0.0, 0.15, size=3),
        "mix": rng.dirichlet(np.full(len(ACTIVITIES), 0.8)),
    }


# Per activity: step frequency (Hz), motion amplitude per axis (g), gravity direction
# in the body frame, and how irregular the motion is.
_ACTIVITY_SHAPE = {
    0: (1.8, (0.35, 0.55, 0.25), (0.0, 0.0, 1.0), 0.10),  # walking
    1: (2.8, (0.9, 1.3, 0.6), (0.0, 0.15, 1.0), 0.25),  # running
    2: (0.0, (0.02, 0.02, 0.02), (0.0, 0.95, 0.3), 0.02),  # sitting
    3: (0.0, (0.03, 0.03, 0.03), (0.0, 0.0, 1.0), 0.03),  # standing
    4: (1.4, (0.3, 0.45, 0.45), (0.0, -0.25, 1.0), 0.12),  # upstairs
    5: (1.6, (0.45, 0.5, 0.35), (0.0, 0.25, 1.0), 0.15),  # downstairs
}


def activity_windows(
    *, user: int, n: int, seed: int = 0, start: int = 0, style: bool = True
) -> tuple[Features, Labels]:
    """``n`` windows of user ``user``'s accelerometer, shape ``[n, 3, 64]``, and their activity.

    Synthetic and seeded: each window is a step-like periodic motion for the activity
    (frequency and amplitude per axis) on top of gravity, turned by how the board sits on
    that user, scaled by their tempo and vigour, plus sensor bias and noise. Users do
    activities in their own proportions (non-IID) and move in their own style, so a model
    personalised on one user's data beats the global one for that user. Windows
    ``start .. start + n`` of a user are always the same windows. ``style=False`` gives
    the neutral style (for a public reference set).
    """
    who = _activity_user(user, seed)
    rng = np.random.default_rng([seed, 104_729, user, start])
    labels = rng.choice(len(ACTIVITIES), size=n, p=who["mix"]).astype(np.int64)
    t = np.arange(ACTIVITY_WINDOW) / ACTIVITY_RATE_HZ
    x = np.empty((n, 3, ACTIVITY_WINDOW), dtype=np.float32)
    tempo = float(who["tempo"][0]) if style else 1.0
    vigour = float(who["vigour"][0]) if style else 1.0
    rotation = who["rotation"] if style else np.eye(3)
    bias = who["bias"] if style else np.zeros(3)
    for i, label in enumerate(labels):
        frequency, amplitude, gravity, jitter = _ACTIVITY_SHAPE[int(label)]
        phase = rng.uniform(0, 2 * np.pi)
        f = frequency * tempo * rng.uniform(0.9, 1.1)
        motion = (
            np.stack(
                [
                    amplitude[0] * np.sin(2 * np.pi * f * t + phase),
                    amplitude[1] * np.abs(np.sin(np.pi * f * t + phase)) * 2 - amplitude[1],
                    amplitude[2] * np.sin(2 * np.pi * 2 * f * t + phase / 2),
                ]
            )
            * vigour
        )
        g = np.asarray(gravity) / np.linalg.norm(gravity)
        body = motion + g[:, None] + rng.normal(0.0, jitter, size=motion.shape)
        x[i] = (rotation @ body + bias[:, None]).astype(np.float32)
    return x, labels
