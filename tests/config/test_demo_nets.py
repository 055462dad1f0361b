"""The demo's own nets: plain nn.Modules that the demo registers as bundles."""

from __future__ import annotations

import numpy as np
import pytest

from config.demo.nets import (
    ARCHS,
    build_model,
    build_model_for_state,
    head_parameter_names,
    initial_weights,
    load_numpy_state,
    parameter_count,
    state_to_numpy,
    widths_of_state,
)


def test_mlp_parameter_names_and_shapes() -> None:
    weights = initial_weights("mlp", seed=0)
    assert {k: v.shape for k, v in weights.items()} == {
        "fc1.weight": (64, 64),
        "fc1.bias": (64,),
        "fc2.weight": (64, 64),
        "fc2.bias": (64,),
        "fc3.weight": (10, 64),
        "fc3.bias": (10,),
    }
    assert all(v.dtype == np.float32 for v in weights.values())
    assert head_parameter_names("mlp") == ("fc3.weight", "fc3.bias")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_maps_a_batch_to_class_logits(arch: str) -> None:
    import torch

    model = build_model(arch)
    out = model(torch.zeros(3, *ARCHS[arch]["input_shape"]))
    assert tuple(out.shape) == (3, ARCHS[arch]["num_classes"])
    assert set(head_parameter_names(arch)) <= set(state_to_numpy(model))


def test_cnn_is_a_few_thousand_parameters() -> None:
    assert 1000 < parameter_count(initial_weights("cnn", seed=0)) < 10000
    assert parameter_count(initial_weights("mlp_small", seed=0)) == 64 * 32 + 32 + 32 * 10 + 10


def test_initial_weights_are_deterministic_and_seeded() -> None:
    a, b = initial_weights("cnn", seed=5), initial_weights("cnn", seed=5)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = initial_weights("cnn", seed=6)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])


def test_numpy_state_round_trip() -> None:
    weights = initial_weights("mlp", seed=1)
    model = build_model("mlp")
    load_numpy_state(model, weights)
    back = state_to_numpy(model)
    assert all(np.array_equal(weights[k], back[k]) for k in weights)


def test_load_rejects_wrong_names_and_shapes() -> None:
    model = build_model("mlp")
    weights = initial_weights("mlp", seed=0)
    with pytest.raises(ValueError, match="missing"):
        load_numpy_state(model, {k: v for k, v in weights.items() if k != "fc1.bias"})
    bad = dict(weights)
    bad["fc2.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="fc2.weight"):
        load_numpy_state(model, bad)


def test_narrow_models_follow_their_weights() -> None:
    model = build_model("cnn", widths=(4, 6))
    state = state_to_numpy(model)
    assert widths_of_state("cnn", state) == (4, 6)
    assert state["fc.weight"].shape == (10, 6 * 16)
    rebuilt = build_model_for_state("cnn", state)
    assert widths_of_state("cnn", state_to_numpy(rebuilt)) == (4, 6)


def test_unknown_arch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("resnet")
