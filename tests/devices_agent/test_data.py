from __future__ import annotations

import numpy as np
import pytest

from devices_agent.data import client_dataset, dirichlet_partition, load_digits_split


def test_split_is_stratified_scaled_and_deterministic() -> None:
    x_train, y_train, x_test, y_test = load_digits_split(seed=3)
    assert x_train.dtype == np.float32 and y_train.dtype == np.int64
    assert x_train.shape[1] == 64 and len(x_train) + len(x_test) == 1797
    assert len(x_test) == pytest.approx(0.2 * 1797, abs=1)
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0
    # Stratified: every label's share of the test split is its share of the whole set.
    all_labels = np.concatenate([y_train, y_test])
    for label in range(10):
        whole = np.mean(all_labels == label)
        assert np.mean(y_test == label) == pytest.approx(whole, abs=0.01)
    again = load_digits_split(seed=3)
    assert np.array_equal(again[0], x_train) and np.array_equal(again[3], y_test)
    other = load_digits_split(seed=4)
    assert not np.array_equal(other[1], y_train)


def test_split_returns_copies() -> None:
    x_train, *_ = load_digits_split()
    x_train[:] = 5.0
    assert load_digits_split()[0].max() <= 1.0


def test_dirichlet_partition_covers_every_example_once() -> None:
    _, y_train, _, _ = load_digits_split()
    parts = dirichlet_partition(y_train, n_clients=8, alpha=0.3, seed=1)
    assert len(parts) == 8
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(y_train)))
    assert min(len(p) for p in parts) >= 5
    again = dirichlet_partition(y_train, n_clients=8, alpha=0.3, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_small_alpha_is_non_iid_and_large_alpha_is_near_iid() -> None:
    _, y_train, _, _ = load_digits_split()

    def mean_l1_from_global(alpha: float) -> float:
        parts = dirichlet_partition(y_train, n_clients=10, alpha=alpha, seed=0)
        overall = np.bincount(y_train, minlength=10) / len(y_train)
        gaps = [np.abs(np.bincount(y_train[p], minlength=10) / len(p) - overall).sum() for p in parts]
        return float(np.mean(gaps))

    skewed = mean_l1_from_global(0.1)
    even = mean_l1_from_global(1000.0)
    assert skewed > 0.8
    assert even < 0.3


def test_partition_tops_up_starved_clients() -> None:
    labels = np.repeat(np.arange(3), 20)
    parts = dirichlet_partition(labels, n_clients=10, alpha=0.01, seed=0, min_examples=4)
    assert min(len(p) for p in parts) >= 4
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(60))


def test_partition_rejects_impossible_requests() -> None:
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet_partition(np.zeros(10, dtype=np.int64), n_clients=5, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_partition(np.zeros(100, dtype=np.int64), n_clients=5, alpha=0.0, seed=0)


def test_client_datasets_partition_the_training_split() -> None:
    x_train, _, _, _ = load_digits_split(seed=0)
    sizes = 0
    for index in range(4):
        x, y = client_dataset(client_index=index, n_clients=4, alpha=0.5, seed=0)
        assert x.shape == (len(y), 64)
        sizes += len(y)
    assert sizes == len(x_train)
    x0, y0 = client_dataset(client_index=0, n_clients=4, alpha=0.5, seed=0)
    assert np.array_equal(y0, client_dataset(client_index=0, n_clients=4, alpha=0.5, seed=0)[1])
    with pytest.raises(ValueError):
        client_dataset(client_index=4, n_clients=4)
