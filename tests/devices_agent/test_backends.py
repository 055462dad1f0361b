"""The PyTorch training backend: a program the agent has never seen, trained on the board's data."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch  # noqa: E402, TID253 - these tests train: torch is required, never skipped

from devices_agent.backends import TrainConfig, available_backends, get_backend
from devices_agent.codecs import decode_tensors, l2_norm
from devices_agent.data import load_digits_split
from devices_agent.family import FamilySpec, SpecError
from devices_agent.program import make_bundle

DIGITS = FamilySpec(task="classification", input_shape=(64,), num_classes=10)


def _mlp(seed: int) -> Any:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 10),
    )


@pytest.fixture(scope="module")
def program() -> tuple[bytes, dict[str, np.ndarray]]:
    bundle = make_bundle(_mlp(0), torch.zeros(2, 64))
    state, _ = decode_tensors(bundle.weights)
    return bundle.program, {k: np.asarray(v) for k, v in state.items()}


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, ...]:
    x_train, y_train, x_test, y_test = load_digits_split(seed=0)
    return x_train[:400], y_train[:400], x_test, y_test


def test_training_reduces_the_loss_and_improves_held_out_accuracy(program: Any, digits: Any) -> None:
    code, state = program
    x, y, x_test, y_test = digits
    backend = get_backend("torch")
    result = backend.train(
        program=code,
        state=state,
        spec=DIGITS,
        x=x,
        y=y,
        config=TrainConfig(epochs=5, lr=0.01, optimizer="adam"),
    )
    assert result.num_examples == 400
    assert result.metrics["train_loss"] < 0.5 * result.metrics["initial_loss"]
    assert result.metrics["train_accuracy"] > 0.8
    assert set(result.delta) == {k for k in state if k.endswith(("weight", "bias"))}
    before = backend.evaluate(program=code, state=state, spec=DIGITS, x=x_test, y=y_test)["accuracy"]
    trained = {k: state[k] + result.delta.get(k, 0) for k in state}
    after = backend.evaluate(program=code, state=trained, spec=DIGITS, x=x_test, y=y_test)
    assert after["accuracy"] > before + 0.5 and len(after["confusion"]) == 10


def test_training_is_deterministic_for_a_seed(program: Any, digits: Any) -> None:
    code, state = program
    x, y, _, _ = digits
    backend = get_backend("torch")

    def run(seed: int) -> Any:
        config = TrainConfig(epochs=1, batch_size=16, lr=0.05, momentum=0.9, seed=seed)
        return backend.train(program=code, state=state, spec=DIGITS, x=x[:100], y=y[:100], config=config)

    a, b, c = run(7), run(7), run(8)
    assert all(np.array_equal(a.delta[k], b.delta[k]) for k in a.delta)
    assert any(not np.array_equal(a.delta[k], c.delta[k]) for k in a.delta)


def test_fedprox_clip_and_stop(program: Any, digits: Any) -> None:
    code, state = program
    x, y, _, _ = digits
    backend = get_backend("torch")
    base = TrainConfig(epochs=3, lr=0.05)
    free = backend.train(program=code, state=state, spec=DIGITS, x=x, y=y, config=base)
    prox = backend.train(
        program=code, state=state, spec=DIGITS, x=x, y=y, config=TrainConfig(epochs=3, lr=0.05, prox_mu=1.0)
    )
    assert l2_norm(prox.delta) < l2_norm(free.delta)
    clipped = backend.train(
        program=code, state=state, spec=DIGITS, x=x, y=y, config=TrainConfig(epochs=3, lr=0.05, clip_norm=0.1)
    )
    assert l2_norm(clipped.delta) <= 0.1 + 1e-5 and clipped.metrics["clip_scale"] < 1.0
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    stopped = backend.train(
        program=code, state=state, spec=DIGITS, x=x, y=y, config=base, should_stop=stop_after_three
    )
    assert stopped.metrics["stopped"] == 1.0 and stopped.metrics["steps"] == 3.0


def test_a_head_only_update_leaves_the_body_frozen(program: Any, digits: Any) -> None:
    code, state = program
    x, y, _, _ = digits
    head = ["4.weight", "4.bias"]
    result = get_backend("torch").train(
        program=code, state=state, spec=DIGITS, x=x, y=y, config=TrainConfig(epochs=1), trainable=head
    )
    assert set(result.delta) == set(head) and l2_norm(result.delta) > 0


def test_bad_inputs_are_refused_with_the_reason(program: Any, digits: Any) -> None:
    code, state = program
    x, y, _, _ = digits
    backend = get_backend("torch")
    config = TrainConfig(epochs=1, lr=0.1)
    with pytest.raises(SpecError, match="shape"):
        backend.train(program=code, state=state, spec=DIGITS, x=x[:, :10], y=y, config=config)
    with pytest.raises(SpecError, match="labels"):
        backend.train(program=code, state=state, spec=DIGITS, x=x, y=y + 10, config=config)
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="diverged|non-finite"):
        backend.train(
            program=code, state=state, spec=DIGITS, x=x * 1e30, y=y, config=TrainConfig(epochs=2, lr=10.0)
        )
    with pytest.raises(ValueError, match="not parameters"):
        backend.train(program=code, state=state, spec=DIGITS, x=x, y=y, config=config, trainable=["nope"])


def test_training_restores_the_thread_count(program: Any, digits: Any) -> None:
    code, state = program
    x, y, _, _ = digits
    before = torch.get_num_threads()
    get_backend("torch").train(
        program=code, state=state, spec=DIGITS, x=x[:32], y=y[:32], config=TrainConfig()
    )
    assert torch.get_num_threads() == before


def test_a_regression_program_trains_with_mean_squared_error() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    bundle = make_bundle(model, torch.zeros(2, 3))
    state, _ = decode_tensors(bundle.weights)
    spec = FamilySpec(task="regression", input_shape=(3,), output_size=2)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 3)).astype(np.float32)
    y = np.stack([x[:, 0] * 2 - x[:, 1], x[:, 2]], axis=1).astype(np.float32)
    backend = get_backend("torch")
    result = backend.train(
        program=bundle.program,
        state=state,
        spec=spec,
        x=x,
        y=y,
        config=TrainConfig(epochs=20, lr=0.01, optimizer="adam"),
    )
    trained = {k: np.asarray(state[k]) + result.delta.get(k, 0) for k in state}
    before = backend.evaluate(program=bundle.program, state=state, spec=spec, x=x, y=y)
    after = backend.evaluate(program=bundle.program, state=trained, spec=spec, x=x, y=y)
    assert after["mae"] < 0.5 * before["mae"] and after["rmse"] >= after["mae"] and "accuracy" not in after
    assert "train_mae" in result.metrics


def test_backends_this_board_has() -> None:
    assert "torch" in available_backends()
    with pytest.raises(ValueError, match="unknown training backend"):
        get_backend("tensorflow")
