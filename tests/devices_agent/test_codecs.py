"""Codecs for weights and deltas: round trips, error feedback, and every rejection."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import save as st_save

from devices_agent.codecs import (
    CODEC_VERSION,
    CODECS,
    WireError,
    clip_by_norm,
    decode_delta,
    decode_tensors,
    encode_delta,
    encode_tensors,
    expected_layout,
    l2_norm,
)


def make_delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.normal(size=(16, 8)).astype(np.float32),
        "fc1.bias": rng.normal(size=(16,)).astype(np.float32),
        "fc2.weight": rng.normal(scale=0.01, size=(4, 16)).astype(np.float32),
    }


def expected_of(delta: dict[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    return expected_layout(delta)


META = {"codec": "none", "codec_version": str(CODEC_VERSION)}


def rejection(data: bytes, delta: dict[str, np.ndarray], **kwargs: object) -> WireError:
    with pytest.raises(WireError) as info:
        decode_delta(data, expected=expected_of(delta), **kwargs)  # type: ignore[arg-type]
    return info.value


# --------------------------------------------------------------------------- weights


def test_weights_round_trip_with_metadata() -> None:
    weights = make_delta()
    data = encode_tensors(weights, metadata={"model_version": "7"})
    tensors, metadata = decode_tensors(data)
    assert metadata == {"model_version": "7"}
    assert set(tensors) == set(weights)
    for name, t in weights.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], t)


@pytest.mark.parametrize("cut", [0, 4, 20, -1])
def test_weights_truncated(cut: int) -> None:
    data = encode_tensors(make_delta())
    with pytest.raises(WireError) as info:
        decode_tensors(data[:cut])
    assert info.value.code == "truncated"


def test_weights_garbage() -> None:
    garbage = struct.pack("<Q", 10) + b"not json!!" + b"\x00" * 8
    with pytest.raises(WireError) as info:
        decode_tensors(garbage)
    assert info.value.code == "malformed"


# --------------------------------------------------------------------------- round trips


def test_none_is_exact() -> None:
    delta = make_delta()
    encoded = encode_delta(delta, codec="none")
    assert encoded.codec == "none" and encoded.residual is None
    assert encoded.raw_bytes == sum(t.nbytes for t in delta.values())
    out = decode_delta(encoded.data, expected=expected_of(delta))
    for name, t in delta.items():
        assert out[name].dtype == np.float32
        np.testing.assert_array_equal(out[name], t)


def test_fp16_is_close_and_smaller() -> None:
    delta = make_delta()
    encoded = encode_delta(delta, codec="fp16")
    out = decode_delta(encoded.data, expected=expected_of(delta))
    for name, t in delta.items():
        np.testing.assert_allclose(out[name], t, rtol=1e-3, atol=1e-6)
    assert len(encoded.data) < len(encode_delta(delta, codec="none").data)


def test_int8_error_is_at_most_half_a_step() -> None:
    delta = make_delta()
    encoded = encode_delta(delta, codec="int8")
    out = decode_delta(encoded.data, expected=expected_of(delta))
    header_len = struct.unpack("<Q", encoded.data[:8])[0]
    scales = json.loads(json.loads(encoded.data[8 : 8 + header_len])["__metadata__"]["scales"])
    for name, t in delta.items():
        assert scales[name] == pytest.approx(np.abs(t).max() / 127)
        # Half a quantisation step, plus float32 rounding of the product.
        assert np.abs(out[name] - t).max() <= scales[name] / 2 * (1 + 1e-5)
    # The largest entry survives exactly up to float rounding (it maps to +-127).
    assert len(encoded.data) < len(encode_delta(delta, codec="fp16").data)


def test_int8_all_zero_tensor() -> None:
    delta = {"w": np.zeros((3, 3), np.float32)}
    out = decode_delta(encode_delta(delta, codec="int8").data, expected=expected_of(delta))
    np.testing.assert_array_equal(out["w"], 0.0)


def test_topk_keeps_largest_exactly_and_residual_holds_the_rest() -> None:
    delta = make_delta()
    encoded = encode_delta(delta, codec="topk", topk_fraction=0.25)
    out = decode_delta(encoded.data, expected=expected_of(delta))
    assert encoded.residual is not None
    for name, t in delta.items():
        k = int(np.ceil(0.25 * t.size))
        kept = out[name] != 0
        assert kept.sum() == k
        # Kept entries are exact and are the largest by magnitude.
        np.testing.assert_array_equal(out[name][kept], t[kept])
        assert np.abs(t[kept]).min() >= np.abs(t[~kept]).max()
        # What was not sent is the residual, exactly.
        np.testing.assert_array_equal(out[name] + encoded.residual[name], t)
        np.testing.assert_array_equal(encoded.residual[name][kept], 0.0)


def test_topk_error_feedback_conserves_the_sum_over_rounds() -> None:
    residual = None
    sent_total = {name: np.zeros_like(t, dtype=np.float64) for name, t in make_delta().items()}
    delta_total = {name: np.zeros_like(t, dtype=np.float64) for name, t in make_delta().items()}
    for round_ in range(6):
        delta = make_delta(seed=round_)
        encoded = encode_delta(delta, codec="topk", topk_fraction=0.1, residual=residual)
        out = decode_delta(encoded.data, expected=expected_of(delta))
        residual = encoded.residual
        for name in delta:
            sent_total[name] += out[name]
            delta_total[name] += delta[name]
    assert residual is not None
    for name in delta_total:
        np.testing.assert_allclose(sent_total[name] + residual[name], delta_total[name], atol=1e-5)


def test_topk_residual_changes_what_is_sent() -> None:
    delta = {"w": np.array([1.0, 0.0, 0.0, 0.5], np.float32)}
    residual = {"w": np.array([0.0, 0.0, 3.0, 0.0], np.float32)}
    encoded = encode_delta(delta, codec="topk", topk_fraction=0.25, residual=residual)
    out = decode_delta(encoded.data, expected=expected_of(delta))
    np.testing.assert_array_equal(out["w"], [0.0, 0.0, 3.0, 0.0])
    assert encoded.residual is not None
    np.testing.assert_array_equal(encoded.residual["w"], [1.0, 0.0, 0.0, 0.5])


@settings(max_examples=40, deadline=None)
@given(
    arr=hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
        elements=st.floats(-1e4, 1e4, width=32),
    ),
    codec=st.sampled_from(CODECS),
    fraction=st.floats(0.01, 1.0),
)
def test_every_codec_round_trips(arr: np.ndarray, codec: str, fraction: float) -> None:
    delta = {"layer.weight": arr}
    encoded = encode_delta(delta, codec=codec, topk_fraction=fraction)
    out = decode_delta(encoded.data, expected=expected_of(delta))["layer.weight"]
    assert out.shape == arr.shape and out.dtype == np.float32
    peak = float(np.abs(arr).max()) if arr.size else 0.0
    if codec == "none":
        np.testing.assert_array_equal(out, arr)
    elif codec == "fp16":
        np.testing.assert_allclose(out, arr, rtol=1e-3, atol=1e-3)
    elif codec == "int8":
        assert np.abs(out - arr).max() <= peak / 127 / 2 * (1 + 1e-5) + 1e-30
    else:
        assert encoded.residual is not None
        np.testing.assert_array_equal(out + encoded.residual["layer.weight"], arr)


# --------------------------------------------------------------------------- rejections


def test_non_finite_nan() -> None:
    delta = make_delta()
    bad = dict(delta, **{"fc1.bias": delta["fc1.bias"].copy()})
    bad["fc1.bias"][3] = np.nan
    err = rejection(st_save(bad, metadata=META), delta)
    assert err.code == "non_finite" and err.tensor == "fc1.bias"
    assert "fc1.bias" in str(err)


@pytest.mark.parametrize("codec", ["none", "fp16", "topk"])
def test_non_finite_inf(codec: str) -> None:
    delta = make_delta()
    tensors, meta = decode_tensors(encode_delta(delta, codec=codec, topk_fraction=0.5).data)
    key = "fc2.weight::values" if codec == "topk" else "fc2.weight"
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] = np.inf
    err = rejection(st_save(tensors, metadata=meta), delta)
    assert err.code == "non_finite" and err.tensor == "fc2.weight"


def test_int8_overflowing_scale_is_non_finite() -> None:
    delta = make_delta()
    tensors, meta = decode_tensors(encode_delta(delta, codec="int8").data)
    scales = json.loads(meta["scales"])
    scales["fc1.weight"] = 1e38  # finite, but q * scale overflows float32
    err = rejection(st_save(tensors, metadata=dict(meta, scales=json.dumps(scales))), delta)
    assert err.code == "non_finite" and err.tensor == "fc1.weight"


@pytest.mark.parametrize("codec", CODECS)
def test_encoder_refuses_non_finite_input(codec: str) -> None:
    delta = make_delta()
    delta["fc1.bias"][0] = np.nan
    with pytest.raises(ValueError, match="fc1.bias"):
        encode_delta(delta, codec=codec)


def test_fp16_encoder_refuses_values_out_of_range() -> None:
    with pytest.raises(ValueError, match="float16 range"):
        encode_delta({"w": np.array([1e5], np.float32)}, codec="fp16")


def test_int8_bad_scale() -> None:
    delta = make_delta()
    encoded = encode_delta(delta, codec="int8")
    tensors, meta = decode_tensors(encoded.data)
    for scale in [0.0, -1.0, float("nan"), None, "1.0"]:
        scales = json.loads(meta["scales"])
        scales["fc1.bias"] = scale
        payload = st_save(tensors, metadata=dict(meta, scales=json.dumps(scales)))
        err = rejection(payload, delta)
        assert err.code == "bad_scale" and err.tensor == "fc1.bias"


def test_wrong_shape() -> None:
    delta = make_delta()
    bad = dict(delta, **{"fc1.weight": delta["fc1.weight"].T.copy()})
    err = rejection(st_save(bad, metadata=META), delta)
    assert err.code == "shape_mismatch" and err.tensor == "fc1.weight"


def test_topk_declared_shape_mismatch() -> None:
    delta = make_delta()
    encoded = encode_delta(delta, codec="topk")
    tensors, meta = decode_tensors(encoded.data)
    shapes = json.loads(meta["shapes"])
    shapes["fc1.bias"] = [17]
    err = rejection(st_save(tensors, metadata=dict(meta, shapes=json.dumps(shapes))), delta)
    assert err.code == "shape_mismatch" and err.tensor == "fc1.bias"


def test_float64_dtype() -> None:
    delta = make_delta()
    bad = dict(delta, **{"fc1.bias": delta["fc1.bias"].astype(np.float64)})
    err = rejection(st_save(bad, metadata=META), delta)
    assert err.code == "dtype_mismatch" and err.tensor == "fc1.bias"


def test_int_dtype_where_float_expected() -> None:
    delta = make_delta()
    bad = dict(delta, **{"fc1.bias": delta["fc1.bias"].astype(np.int32)})
    err = rejection(st_save(bad, metadata=META), delta)
    assert err.code == "dtype_mismatch"


def test_extra_tensor() -> None:
    delta = make_delta()
    bad = dict(delta, sneaky=np.zeros(3, np.float32))
    err = rejection(st_save(bad, metadata=META), delta)
    assert err.code == "unknown_tensor" and err.tensor == "sneaky"


def test_missing_tensor() -> None:
    delta = make_delta()
    bad = {k: v for k, v in delta.items() if k != "fc1.bias"}
    err = rejection(st_save(bad, metadata=META), delta)
    assert err.code == "missing_tensor" and err.tensor == "fc1.bias"


@pytest.mark.parametrize("codec", CODECS)
def test_truncated(codec: str) -> None:
    delta = make_delta()
    data = encode_delta(delta, codec=codec).data
    for cut in (3, 8, 40, len(data) - 1):
        err = rejection(data[:cut], delta)
        assert err.code == "truncated", (cut, err)


def test_too_large() -> None:
    delta = make_delta()
    data = encode_delta(delta, codec="none").data
    err = rejection(data, delta, max_bytes=len(data) - 1)
    assert err.code == "too_large"
    assert decode_delta(data, expected=expected_of(delta), max_bytes=len(data))


@pytest.mark.parametrize(
    "indices",
    [[0, 1, 16], [-1, 0, 1], [2, 1, 0], [3, 3, 4]],
    ids=["past_end", "negative", "unsorted", "duplicate"],
)
def test_bad_topk_index(indices: list[int]) -> None:
    delta = {"w": np.arange(16, dtype=np.float32)}
    encoded = encode_delta(delta, codec="topk", topk_fraction=3 / 16)
    tensors, meta = decode_tensors(encoded.data)
    tensors["w::indices"] = np.array(indices, np.int32)
    err = rejection(st_save(tensors, metadata=meta), delta)
    assert err.code == "bad_index" and err.tensor == "w"


def test_topk_index_value_count_mismatch() -> None:
    delta = {"w": np.arange(16, dtype=np.float32)}
    tensors, meta = decode_tensors(encode_delta(delta, codec="topk", topk_fraction=0.25).data)
    tensors["w::values"] = tensors["w::values"][:-1].copy()
    err = rejection(st_save(tensors, metadata=meta), delta)
    assert err.code == "shape_mismatch"


@pytest.mark.parametrize(
    "meta",
    [
        {"codec": "zstd", "codec_version": "1"},
        {"codec": "none", "codec_version": "99"},
        {"codec_version": "1"},
        {},
    ],
)
def test_unknown_codec(meta: dict[str, str]) -> None:
    delta = make_delta()
    err = rejection(st_save(delta, metadata=meta or None), delta)
    assert err.code == "bad_codec"


def test_codec_dtype_must_match_declared_codec() -> None:
    # float16 tensors labelled as codec "none" are not accepted as float32.
    delta = make_delta()
    halves = {k: v.astype(np.float16) for k, v in delta.items()}
    err = rejection(st_save(halves, metadata=META), delta)
    assert err.code == "dtype_mismatch"


def test_wire_error_is_a_value_error() -> None:
    assert issubclass(WireError, ValueError)


# --------------------------------------------------------------------------- clipping


def test_l2_norm_and_clip() -> None:
    tensors = {"a": np.array([3.0, 0.0], np.float32), "b": np.array([[4.0]], np.float32)}
    assert l2_norm(tensors) == pytest.approx(5.0)
    clipped, scale = clip_by_norm(tensors, max_norm=1.0)
    assert scale == pytest.approx(0.2)
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], rtol=1e-6)
    same, scale = clip_by_norm(tensors, max_norm=10.0)
    assert scale == 1.0
    np.testing.assert_array_equal(same["b"], tensors["b"])
