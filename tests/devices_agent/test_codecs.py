"""Codecs for weights and deltas: round trips, error feedback, and every rejection."""

from __future__ import annotations

import struct
import zlib

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


def meta_of(codec: str, **extra: str) -> dict[str, str]:
    return {"codec": codec, "codec_version": str(CODEC_VERSION), **extra}


def plain_parts(delta: dict[str, np.ndarray], codec: str, **kwargs: object) -> dict[str, np.ndarray]:
    """The un-deflated parts of an int8/topk payload, whichever form the encoder chose."""
    encoded = encode_delta(delta, codec=codec, **kwargs)  # type: ignore[arg-type]
    tensors, meta = decode_tensors(encoded.data)
    if meta.get("deflate") != "zlib":
        return tensors
    body = zlib.decompress(tensors["::deflate"].tobytes())
    if codec == "int8":
        count = len(delta)
        return {
            "::scales": np.frombuffer(body[: 4 * count], "<f4").copy(),
            "::int8": np.frombuffer(body[4 * count :], np.int8).copy(),
        }
    mask_len = (sum(t.size for t in delta.values()) + 7) // 8
    return {
        "::mask": np.frombuffer(body[:mask_len], np.uint8).copy(),
        "::values": np.frombuffer(body[mask_len:], "<f2").copy(),
    }


def deflated(parts: list[np.ndarray], codec: str, stream: bytes | None = None) -> bytes:
    """A hand-made deflated payload of the given parts (or of a given zlib stream)."""
    if stream is None:
        stream = zlib.compress(b"".join(p.tobytes() for p in parts))
    return st_save({"::deflate": np.frombuffer(stream, np.uint8)}, metadata=meta_of(codec, deflate="zlib"))


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
    # Scales travel in sorted name order, one float32 each.
    scales = dict(zip(sorted(delta), plain_parts(delta, "int8")["::scales"].tolist(), strict=True))
    for name, t in delta.items():
        assert scales[name] == pytest.approx(np.abs(t).max() / 127)
        # Half a quantisation step, plus float32 rounding of the product.
        assert np.abs(out[name] - t).max() <= scales[name] / 2 * (1 + 1e-5)
    assert len(encoded.data) < len(encode_delta(delta, codec="fp16").data)


def test_int8_is_one_flat_buffer_and_deflates_when_smaller() -> None:
    # A smooth, low-entropy delta deflates well; random normal noise much less so.
    delta = {"a": np.tile(np.linspace(-1, 1, 50, dtype=np.float32), 40), "b": np.ones(7, np.float32)}
    encoded = encode_delta(delta, codec="int8")
    tensors, meta = decode_tensors(encoded.data)
    assert meta["deflate"] == "zlib" and set(tensors) == {"::deflate"}
    assert len(encoded.data) < 2007 / 2
    out = decode_delta(encoded.data, expected=expected_of(delta))
    np.testing.assert_allclose(out["b"], 1.0, rtol=1e-6)
    parts = plain_parts(delta, "int8")
    assert parts["::int8"].shape == (2007,) and parts["::scales"].shape == (2,)
    # The plain form decodes to the same values.
    plain = st_save(parts, metadata=meta_of("int8"))
    for name, t in decode_delta(plain, expected=expected_of(delta)).items():
        np.testing.assert_array_equal(t, out[name])


def test_int8_all_zero_tensor() -> None:
    delta = {"w": np.zeros((3, 3), np.float32)}
    out = decode_delta(encode_delta(delta, codec="int8").data, expected=expected_of(delta))
    np.testing.assert_array_equal(out["w"], 0.0)


def test_topk_keeps_largest_and_residual_holds_the_rest() -> None:
    delta = make_delta()
    encoded = encode_delta(delta, codec="topk", topk_fraction=0.25)
    out = decode_delta(encoded.data, expected=expected_of(delta))
    assert encoded.residual is not None
    for name, t in delta.items():
        k = int(np.ceil(0.25 * t.size))
        kept = out[name] != 0
        assert kept.sum() == k
        # Kept entries are the largest by magnitude, sent as float16.
        np.testing.assert_array_equal(out[name][kept], t[kept].astype(np.float16).astype(np.float32))
        assert np.abs(t[kept]).min() >= np.abs(t[~kept]).max()
        # What was not sent, and the float16 rounding of what was, is the residual, exactly.
        np.testing.assert_array_equal(out[name] + encoded.residual[name], t)
        assert np.abs(encoded.residual[name][kept]).max() <= np.abs(t[kept]).max() * 2**-11


def test_topk_wire_is_a_bitmap_and_float16_values() -> None:
    delta = {"b": np.arange(1, 801, dtype=np.float32), "a": -np.arange(1, 201, dtype=np.float32)}
    encoded = encode_delta(delta, codec="topk", topk_fraction=0.1)
    parts = plain_parts(delta, "topk", topk_fraction=0.1)
    assert parts["::mask"].shape == (125,) and parts["::values"].dtype == np.float16
    bits = np.unpackbits(parts["::mask"]).astype(bool)
    # Sorted name order: "a" (200 entries) then "b" (800 entries).
    np.testing.assert_array_equal(np.flatnonzero(bits[:200]), np.arange(180, 200))
    np.testing.assert_array_equal(np.flatnonzero(bits[200:]), np.arange(720, 800))
    # 1000 parameters at 10%: 125 bytes of bitmap + 100 float16 values, well under 1 B/param.
    assert len(encoded.data) < 600 < 1000 * 4 / 6


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
        np.testing.assert_allclose(out[out != 0], arr[out != 0], rtol=2**-11, atol=2**-25)


# --------------------------------------------------------------------------- rejections


def test_non_finite_nan() -> None:
    delta = make_delta()
    bad = dict(delta, **{"fc1.bias": delta["fc1.bias"].copy()})
    bad["fc1.bias"][3] = np.nan
    err = rejection(st_save(bad, metadata=META), delta)
    assert err.code == "non_finite" and err.tensor == "fc1.bias"
    assert "fc1.bias" in str(err)


@pytest.mark.parametrize("codec", ["none", "fp16"])
def test_non_finite_inf(codec: str) -> None:
    delta = make_delta()
    tensors, meta = decode_tensors(encode_delta(delta, codec=codec).data)
    tensors["fc2.weight"] = tensors["fc2.weight"].copy()
    tensors["fc2.weight"].flat[0] = np.inf
    err = rejection(st_save(tensors, metadata=meta), delta)
    assert err.code == "non_finite" and err.tensor == "fc2.weight"


@pytest.mark.parametrize("deflate", [False, True])
def test_topk_non_finite_value_names_its_tensor(deflate: bool) -> None:
    delta = make_delta()
    parts = plain_parts(delta, "topk", topk_fraction=0.5)
    # Values are in sorted name order: fc1.bias (8 sent), fc1.weight (64), fc2.weight (32).
    parts["::values"][8 + 64] = np.inf
    if deflate:
        payload = deflated([parts["::mask"], parts["::values"]], "topk")
    else:
        payload = st_save(parts, metadata=meta_of("topk"))
    err = rejection(payload, delta)
    assert err.code == "non_finite" and err.tensor == "fc2.weight"


def test_int8_overflowing_scale_is_non_finite() -> None:
    delta = make_delta()
    parts = plain_parts(delta, "int8")
    parts["::scales"][sorted(delta).index("fc1.weight")] = 3e38  # finite, q * scale overflows
    err = rejection(st_save(parts, metadata=meta_of("int8")), delta)
    assert err.code == "non_finite" and err.tensor == "fc1.weight"


@pytest.mark.parametrize("codec", CODECS)
def test_encoder_refuses_non_finite_input(codec: str) -> None:
    delta = make_delta()
    delta["fc1.bias"][0] = np.nan
    with pytest.raises(ValueError, match="fc1.bias"):
        encode_delta(delta, codec=codec)


@pytest.mark.parametrize("codec", ["fp16", "topk"])
def test_float16_encoders_refuse_values_out_of_range(codec: str) -> None:
    with pytest.raises(ValueError, match="float16 range"):
        encode_delta({"w": np.array([1e5, 1.0], np.float32)}, codec=codec, topk_fraction=0.5)


def test_int8_subnormal_tensor_keeps_a_positive_scale() -> None:
    delta = {"w": np.array([1e-45, -1e-45, 0.0], np.float32)}
    out = decode_delta(encode_delta(delta, codec="int8").data, expected=expected_of(delta))
    np.testing.assert_array_equal(out["w"], delta["w"])


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_int8_bad_scale(scale: float) -> None:
    delta = make_delta()
    parts = plain_parts(delta, "int8")
    parts["::scales"][sorted(delta).index("fc1.bias")] = scale
    err = rejection(st_save(parts, metadata=meta_of("int8")), delta)
    assert err.code == "bad_scale" and err.tensor == "fc1.bias"


def test_wrong_shape() -> None:
    delta = make_delta()
    bad = dict(delta, **{"fc1.weight": delta["fc1.weight"].T.copy()})
    err = rejection(st_save(bad, metadata=META), delta)
    assert err.code == "shape_mismatch" and err.tensor == "fc1.weight"


@pytest.mark.parametrize(
    ("codec", "part", "length"),
    [("topk", "::mask", 50), ("int8", "::int8", 207), ("int8", "::scales", 2)],
)
def test_packed_part_of_the_wrong_length(codec: str, part: str, length: int) -> None:
    delta = make_delta()  # 208 parameters in 3 tensors
    parts = plain_parts(delta, codec)
    parts[part] = np.resize(parts[part], length)
    err = rejection(st_save(parts, metadata=meta_of(codec)), delta)
    assert err.code == "shape_mismatch" and err.tensor == part


@pytest.mark.parametrize(("codec", "part"), [("topk", "::values"), ("int8", "::int8"), ("int8", "::scales")])
def test_packed_part_of_the_wrong_dtype(codec: str, part: str) -> None:
    delta = make_delta()
    parts = plain_parts(delta, codec)
    parts[part] = parts[part].astype(np.float64)
    err = rejection(st_save(parts, metadata=meta_of(codec)), delta)
    assert err.code == "dtype_mismatch" and err.tensor == part


@pytest.mark.parametrize("codec", ["int8", "topk"])
def test_packed_layout_names(codec: str) -> None:
    delta = make_delta()
    parts = plain_parts(delta, codec)
    extra = dict(parts, **{"fc1.bias": delta["fc1.bias"]})
    err = rejection(st_save(extra, metadata=meta_of(codec)), delta)
    assert err.code == "unknown_tensor" and err.tensor == "fc1.bias"
    first = sorted(parts)[0]
    missing = {k: v for k, v in parts.items() if k != first}
    err = rejection(st_save(missing, metadata=meta_of(codec)), delta)
    assert err.code == "missing_tensor" and err.tensor == first
    # A per-parameter payload labelled with a packed codec is refused by name.
    err = rejection(st_save(delta, metadata=meta_of(codec)), delta)
    assert err.code == "unknown_tensor"


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


@pytest.mark.parametrize("deflate", [False, True])
@pytest.mark.parametrize("change", ["one_value_short", "one_value_extra", "extra_bit", "padding_bit"])
def test_topk_bitmap_population_must_match_values(change: str, deflate: bool) -> None:
    delta = {"w": np.arange(1, 13, dtype=np.float32)}  # 12 entries: 2 bytes, 4 padding bits
    parts = plain_parts(delta, "topk", topk_fraction=0.25)
    mask, values = parts["::mask"].copy(), parts["::values"]
    np.testing.assert_array_equal(np.unpackbits(mask)[:12].nonzero()[0], [9, 10, 11])
    if change == "one_value_short":
        values = values[:-1]
    elif change == "one_value_extra":
        values = np.append(values, np.float16(1.0))
    elif change == "extra_bit":
        mask[0] |= 0x80  # entry 0 marked, but no value for it
    else:
        mask[1] |= 0x01  # bit 15: past the 12 parameter entries
    if deflate:
        payload = deflated([mask, values], "topk")
    else:
        payload = st_save({"::mask": mask, "::values": values}, metadata=meta_of("topk"))
    err = rejection(payload, delta)
    assert err.code == "bad_index", err


def test_decompression_bomb_is_refused_without_inflating_it() -> None:
    delta = make_delta()  # 208 parameters: a legitimate int8 body is 3 * 4 + 208 bytes
    bomb = zlib.compress(b"\x00" * 50_000_000, 9)
    assert len(bomb) < 60_000
    for codec in ("int8", "topk"):
        err = rejection(deflated([], codec, stream=bomb), delta)
        assert err.code == "too_large"
    # One byte more than the layout allows is already too much.
    parts = plain_parts(delta, "int8")
    body = parts["::scales"].tobytes() + parts["::int8"].tobytes()
    assert decode_delta(deflated([], "int8", zlib.compress(body)), expected=expected_of(delta))
    err = rejection(deflated([], "int8", zlib.compress(body + b"\x00")), delta)
    assert err.code == "too_large"
    # The byte limit applies to the compressed payload, before anything is inflated.
    payload = deflated([], "int8", bomb)
    assert rejection(payload, delta, max_bytes=len(payload) - 1).code == "too_large"


def test_deflated_stream_errors() -> None:
    delta = make_delta()
    parts = plain_parts(delta, "int8")
    stream = zlib.compress(parts["::scales"].tobytes() + parts["::int8"].tobytes())
    assert rejection(deflated([], "int8", stream[:-5]), delta).code == "truncated"
    assert rejection(deflated([], "int8", b"this is not zlib"), delta).code == "malformed"
    assert rejection(deflated([], "int8", stream + b"tail"), delta).code == "malformed"
    # A complete stream with too few bytes for the layout.
    short = zlib.compress(parts["::scales"].tobytes() + parts["::int8"].tobytes()[:-1])
    assert rejection(deflated([], "int8", short), delta).code == "truncated"
    assert rejection(deflated([], "int8", zlib.compress(b"\x01\x02")), delta).code == "truncated"
    # An odd number of float16 bytes after the bitmap.
    topk = plain_parts(delta, "topk")
    odd = topk["::mask"].tobytes() + topk["::values"].tobytes()[:-1]
    assert rejection(deflated([], "topk", zlib.compress(odd)), delta).code == "malformed"


def test_deflate_flag_is_checked() -> None:
    delta = make_delta()
    parts = plain_parts(delta, "int8")
    stream = zlib.compress(parts["::scales"].tobytes() + parts["::int8"].tobytes())
    good = deflated([], "int8", stream)
    tensors, meta = decode_tensors(good)
    assert rejection(st_save(tensors, metadata=dict(meta, deflate="lzma")), delta).code == "bad_codec"
    assert rejection(st_save(tensors, metadata=dict(meta, codec="none")), delta).code == "bad_codec"
    # The deflated container holds exactly one uint8 tensor.
    extra = dict(tensors, **{"::int8": parts["::int8"]})
    assert rejection(st_save(extra, metadata=meta), delta).code == "unknown_tensor"
    wide = {"::deflate": tensors["::deflate"].astype(np.int16)}
    assert rejection(st_save(wide, metadata=meta), delta).code == "dtype_mismatch"


@pytest.mark.parametrize(
    "meta",
    [
        {"codec": "zstd", "codec_version": str(CODEC_VERSION)},
        {"codec": "none", "codec_version": "99"},
        {"codec": "topk", "codec_version": "1"},
        {"codec_version": str(CODEC_VERSION)},
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
