"""Parity of the ONNX Runtime backend with the PyTorch backend, on a torch-less board.

The artifacts come from the pinned builder, the ort backend runs in a virtualenv without
torch (``torchless_board``), the torch backend here; both start from the same weights
and see the same examples in the same order (the round's seed) with the same optimizer
settings. Stated tolerances, on every parameter after training:

- plain SGD: max |new_ort - new_torch| <= 1e-6 (measured: about 1e-8 on the MLP, 6e-8
  on the CNN, float32 round-off of the same arithmetic);
- Adam (PyTorch's formula in both): <= 1e-4 (Adam divides by the square root of the
  second moment, which magnifies round-off where gradients are tiny).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.ort_helpers import OrtRefused, build_archive, run_ort

pytestmark = pytest.mark.slow

SGD_TOLERANCE = 1e-6
ADAM_TOLERANCE = 1e-4


@functools.cache
def _regression_bundle() -> Any:
    import torch

    from devices_agent.program import make_bundle

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    return make_bundle(model, torch.zeros(2, 8))


def _case(name: str) -> tuple[Any, Any, np.ndarray, np.ndarray]:
    """(bundle, spec, x, y) of a test case."""
    from config.demo.nets import spec_fields
    from devices_agent.data import activity_windows, client_dataset
    from devices_agent.family import FamilySpec

    if name == "regression":
        rng = np.random.default_rng(0)
        x = rng.standard_normal((150, 8)).astype(np.float32)
        y = np.stack([x[:, :4].sum(1), np.sin(x[:, 4])], axis=1).astype(np.float32)
        spec = FamilySpec(task="regression", input_shape=(8,), output_size=2)
        return _regression_bundle(), spec, x, y
    fields = spec_fields(name)
    spec = FamilySpec(
        task=fields["task"], input_shape=tuple(fields["input_shape"]), num_classes=fields["num_classes"]
    )
    examples = (
        client_dataset(client_index=0, n_clients=3, alpha=0.5, seed=0)
        if name == "mlp"
        else activity_windows(user=0, n=200, seed=0)
    )
    return _bundle(name), spec, np.asarray(examples[0], np.float32), np.asarray(examples[1])


@functools.cache
def _bundle(arch: str) -> Any:
    from config.demo.nets import bundle

    return bundle(arch)


@pytest.fixture(scope="module")
def archives(ort_builder_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Each case's artifacts, built once for the module."""
    out: dict[str, bytes] = {}
    for name in ("mlp", "activity", "regression"):
        made, spec, _, _ = _case(name)
        archive, answer = build_archive(
            ort_builder_python,
            onnx=made.onnx,
            spec=spec,
            trainable=made.parameters,
            folder=tmp_path_factory.mktemp(f"built-{name}"),
        )
        assert archive is not None, answer
        assert answer["manifest"]["builder"]["onnxruntime-training-cpu"] == "1.19.2"
        out[name] = archive
    return out


def _state(made: Any) -> dict[str, np.ndarray]:
    from devices_agent.codecs import decode_tensors

    tensors, _ = decode_tensors(made.weights)
    return {k: np.asarray(v) for k, v in tensors.items()}


def _torch(made: Any, spec: Any, x: np.ndarray, y: np.ndarray, config: Any, trainable: Any = None) -> Any:
    from devices_agent.backends import get_backend

    return get_backend("torch").train(
        program=made.program, state=_state(made), spec=spec, x=x, y=y, config=config, trainable=trainable
    )


def _max_param_diff(
    state: dict[str, np.ndarray], a: dict[str, np.ndarray], b: dict[str, np.ndarray]
) -> float:
    assert set(a) == set(b)
    return max(
        float(np.abs((state[k].astype(np.float64) + a[k]) - (state[k].astype(np.float64) + b[k])).max())
        for k in a
    )


@pytest.mark.parametrize("name", ["mlp", "activity", "regression"])
@pytest.mark.parametrize(
    ("optimizer", "lr", "tolerance"), [("sgd", 0.05, SGD_TOLERANCE), ("adam", 0.002, ADAM_TOLERANCE)]
)
def test_both_backends_train_the_same_parameters(
    name: str,
    optimizer: str,
    lr: float,
    tolerance: float,
    archives: dict[str, bytes],
    torchless_board: Any,
    tmp_path: Path,
) -> None:
    from devices_agent.backends import TrainConfig

    made, spec, x, y = _case(name)
    config = TrainConfig(epochs=3, batch_size=32, lr=lr, optimizer=optimizer, seed=1234)
    expected = _torch(made, spec, x, y, config)
    delta, metrics = run_ort(
        torchless_board,
        archive=archives[name],
        state=_state(made),
        spec=spec,
        x=x,
        y=y,
        config=config,
        folder=tmp_path,
    )
    diff = _max_param_diff(_state(made), expected.delta, delta)
    assert diff <= tolerance, f"{name} {optimizer}: max |param diff| {diff:.3g} > {tolerance:g}"
    assert max(float(np.abs(v).max()) for v in delta.values()) > 100 * tolerance  # it did learn
    assert metrics["steps"] == expected.metrics["steps"] == 3 * -(-len(x) // 32)
    for key in ("initial_loss", "train_loss", "delta_norm", f"train_{spec.primary_metric}"):
        assert metrics[key] == pytest.approx(expected.metrics[key], rel=1e-3, abs=1e-4), key


def test_clipping_a_subset_and_evaluation_match_torch(
    archives: dict[str, bytes], torchless_board: Any, tmp_path: Path
) -> None:
    """The delta is clipped after training as torch clips it; a round may train the head
    only (the other parameters stay put); evaluation gives the same metrics."""
    from devices_agent.backends import TrainConfig, get_backend

    made, spec, x, y = _case("mlp")
    config = TrainConfig(epochs=2, batch_size=16, lr=0.1, seed=7, clip_norm=0.05)
    head = ["fc3.weight", "fc3.bias"]
    expected = _torch(made, spec, x, y, config, trainable=head)
    delta, metrics = run_ort(
        torchless_board,
        archive=archives["mlp"],
        state=_state(made),
        spec=spec,
        x=x,
        y=y,
        config=config,
        trainable=head,
        folder=tmp_path / "train",
    )
    assert set(delta) == set(head)
    assert metrics["clip_scale"] < 1.0 and metrics["clip_scale"] == pytest.approx(
        expected.metrics["clip_scale"]
    )
    assert float(np.sqrt(sum((v.astype(np.float64) ** 2).sum() for v in delta.values()))) == pytest.approx(
        0.05
    )
    assert _max_param_diff(_state(made), expected.delta, delta) <= SGD_TOLERANCE
    measured = get_backend("torch").evaluate(program=made.program, state=_state(made), spec=spec, x=x, y=y)
    _, evaluated = run_ort(
        torchless_board,
        archive=archives["mlp"],
        state=_state(made),
        spec=spec,
        x=x,
        y=y,
        folder=tmp_path / "evaluate",
        command="evaluate",
    )
    assert evaluated["accuracy"] == measured["accuracy"]
    assert evaluated["loss"] == pytest.approx(measured["loss"], rel=1e-5)


def test_the_ort_backend_refuses_fedprox_momentum_and_a_checkpoint_that_does_not_fit(
    archives: dict[str, bytes], torchless_board: Any, tmp_path: Path
) -> None:
    from config.demo.nets import build_model, state_to_numpy
    from devices_agent.backends import TrainConfig

    made, spec, x, y = _case("mlp")

    def train(state: dict[str, np.ndarray], config: Any, folder: str) -> Any:
        return run_ort(
            torchless_board,
            archive=archives["mlp"],
            state=state,
            spec=spec,
            x=x,
            y=y,
            config=config,
            folder=tmp_path / folder,
        )

    with pytest.raises(OrtRefused) as fedprox:
        train(_state(made), TrainConfig(prox_mu=0.1), "fedprox")
    assert fedprox.value.code == "fedprox_unsupported" and "proximal term" in fedprox.value.message
    with pytest.raises(OrtRefused) as momentum:
        train(_state(made), TrainConfig(momentum=0.9), "momentum")
    assert momentum.value.code == "momentum_unsupported"
    # Weights of a narrower net: every name is there, the shapes are not the checkpoint's.
    narrow = state_to_numpy(build_model("mlp", widths=(32, 32)))
    with pytest.raises(OrtRefused) as mismatch:
        train(narrow, TrainConfig(), "mismatch")
    assert mismatch.value.code == "artifacts_mismatch"
    assert "fc1.weight is (64, 64) in the checkpoint, (32, 64) in the weights" in mismatch.value.message
