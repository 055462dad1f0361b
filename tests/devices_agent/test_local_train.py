from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from devices_agent.local_train import (
    apply_delta,
    evaluate_numpy,
    personalise_head,
    rebase_head,
    train_local,
)

from config.demo.nets import build_model, initial_weights, state_to_numpy
from devices_agent.codecs import l2_norm
from devices_agent.data import client_dataset, load_digits_split

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    return x_train[:400], y_train[:400], x_test, y_test


def test_local_training_reduces_loss_and_improves_test_accuracy(digits: Digits) -> None:
    x, y, x_test, y_test = digits
    start = initial_weights("mlp", seed=0)
    result = train_local(
        arch="mlp",
        global_weights=start,
        x=x,
        y=y,
        epochs=5,
        batch_size=32,
        lr=0.01,
        optimizer="adam",
        seed=0,
    )
    assert result.num_examples == 400
    assert result.metrics["train_loss"] < 0.5 * result.metrics["initial_loss"]
    assert result.metrics["train_accuracy"] > 0.8
    assert set(result.delta) == set(start)
    assert all(d.dtype == np.float32 and d.shape == start[k].shape for k, d in result.delta.items())
    _, before = evaluate_numpy(arch="mlp", weights=start, x=x_test, y=y_test)
    _, after = evaluate_numpy(arch="mlp", weights=apply_delta(start, result.delta), x=x_test, y=y_test)
    assert after > before + 0.5


def test_training_is_deterministic_for_a_seed(digits: Digits) -> None:
    x, y, _, _ = digits
    start = initial_weights("cnn", seed=1)
    kwargs: dict[str, Any] = dict(
        arch="cnn", global_weights=start, x=x[:100], y=y[:100], epochs=1, batch_size=16, lr=0.05, momentum=0.9
    )
    a = train_local(seed=7, **kwargs)
    b = train_local(seed=7, **kwargs)
    c = train_local(seed=8, **kwargs)
    assert all(np.array_equal(a.delta[k], b.delta[k]) for k in a.delta)
    assert not np.array_equal(a.delta["fc.weight"], c.delta["fc.weight"])


def test_fedprox_pulls_the_update_toward_the_global_model(digits: Digits) -> None:
    x, y, _, _ = digits
    start = initial_weights("mlp", seed=0)
    common: dict[str, Any] = dict(
        arch="mlp", global_weights=start, x=x, y=y, epochs=3, batch_size=32, lr=0.1, seed=0
    )
    plain = train_local(prox_mu=0.0, **common)
    prox = train_local(prox_mu=1.0, **common)
    assert l2_norm(prox.delta) < 0.8 * l2_norm(plain.delta)


def test_clip_norm_bounds_the_delta(digits: Digits) -> None:
    x, y, _, _ = digits
    result = train_local(
        arch="mlp",
        global_weights=initial_weights("mlp", seed=0),
        x=x[:64],
        y=y[:64],
        epochs=1,
        batch_size=16,
        lr=0.1,
        seed=0,
        clip_norm=0.05,
    )
    assert result.metrics["delta_norm"] > 0.05
    assert l2_norm(result.delta) == pytest.approx(0.05, rel=1e-4)
    assert result.metrics["clip_scale"] < 1.0


def test_should_stop_interrupts_training(digits: Digits) -> None:
    x, y, _, _ = digits
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    result = train_local(
        arch="mlp",
        global_weights=initial_weights("mlp", seed=0),
        x=x,
        y=y,
        epochs=5,
        batch_size=32,
        lr=0.1,
        seed=0,
        should_stop=stop_after_three,
    )
    assert result.metrics["stopped"] == 1.0
    assert result.metrics["steps"] == 3.0


def test_bad_inputs_are_rejected(digits: Digits) -> None:
    x, y, _, _ = digits
    start = initial_weights("mlp", seed=0)
    with pytest.raises(ValueError, match="shape"):
        train_local(
            arch="mlp", global_weights=start, x=x[:, :10], y=y, epochs=1, batch_size=8, lr=0.1, seed=0
        )
    with pytest.raises(ValueError, match="labels"):
        train_local(arch="mlp", global_weights=start, x=x, y=y + 10, epochs=1, batch_size=8, lr=0.1, seed=0)
    with pytest.raises(ValueError, match="optimizer"):
        train_local(
            arch="mlp",
            global_weights=start,
            x=x,
            y=y,
            epochs=1,
            batch_size=8,
            lr=0.1,
            seed=0,
            optimizer="rmsprop",
        )
    with pytest.raises(ValueError, match="diverged|non-finite"):
        train_local(
            arch="mlp", global_weights=start, x=x * 1e30, y=y, epochs=2, batch_size=8, lr=10.0, seed=0
        )


def test_training_restores_the_thread_count(digits: Digits) -> None:
    import torch

    x, y, _, _ = digits
    before = torch.get_num_threads()
    train_local(
        arch="mlp",
        global_weights=initial_weights("mlp", seed=0),
        x=x[:32],
        y=y[:32],
        epochs=1,
        batch_size=32,
        lr=0.1,
        seed=0,
    )
    assert torch.get_num_threads() == before


def test_personal_head_beats_the_global_head_on_a_skewed_client() -> None:
    x_train, y_train, _, _ = load_digits_split(seed=0)
    # A global model trained on only part of the data, then a client with two labels.
    start = initial_weights("mlp", seed=0)
    glob = apply_delta(
        start,
        train_local(
            arch="mlp",
            global_weights=start,
            x=x_train[:300],
            y=y_train[:300],
            epochs=3,
            batch_size=32,
            lr=0.01,
            optimizer="adam",
            seed=0,
        ).delta,
    )
    x, y = client_dataset(client_index=0, n_clients=10, alpha=0.05, seed=0)
    head, global_acc, personal_acc = personalise_head(
        arch="mlp",
        global_weights=glob,
        head_weights=None,
        x=x,
        y=y,
        epochs=20,
        lr=0.05,
        seed=0,
    )
    assert set(head) == {"fc3.weight", "fc3.bias"}
    assert personal_acc >= global_acc
    assert personal_acc > 0.8
    # The body is untouched: only the head differs from the global weights.
    again, _, _ = personalise_head(
        arch="mlp",
        global_weights=glob,
        head_weights=head,
        x=x,
        y=y,
        epochs=0,
        lr=0.05,
        seed=0,
    )
    assert np.array_equal(again["fc3.weight"], head["fc3.weight"])


def test_rebase_keeps_a_fitting_head_and_resets_an_incompatible_one() -> None:
    glob = initial_weights("mlp", seed=0)
    head = {"fc3.weight": np.ones((10, 64), np.float32), "fc3.bias": np.zeros(10, np.float32)}
    kept, status = rebase_head(arch="mlp", new_global=glob, head_weights=head)
    assert status == "kept" and kept is not None
    assert np.array_equal(kept["fc3.weight"], head["fc3.weight"])
    narrower = state_to_numpy(build_model("mlp", widths=(64, 32)))
    reset, status = rebase_head(arch="mlp", new_global=narrower, head_weights=head)
    assert (reset, status) == (None, "reset")
    assert rebase_head(arch="mlp", new_global=glob, head_weights=None) == (None, "reset")
    broken = {"fc3.weight": np.full((10, 64), np.nan, np.float32), "fc3.bias": head["fc3.bias"]}
    assert rebase_head(arch="mlp", new_global=glob, head_weights=broken)[1] == "reset"


def test_training_leaves_the_callers_torch_rng_alone(digits: Digits) -> None:
    import torch

    x, y, _, _ = digits
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_local(
        arch="cnn",
        global_weights=initial_weights("cnn", seed=0),
        x=x[:32],
        y=y[:32],
        epochs=1,
        batch_size=16,
        lr=0.1,
        seed=0,
    )
    assert torch.equal(torch.rand(3), expected)
