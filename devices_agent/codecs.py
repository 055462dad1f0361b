"""Tensor and delta codecs shared byte for byte by the agent and the server.

Weights and deltas travel as safetensors (never pickle). A model state is a
``dict[str, np.ndarray]`` of float32 arrays.

Delta payload layout, version 2 (safetensors metadata ``codec`` and ``codec_version``
always set). Where a layout concatenates parameters, it does so in sorted name order
(both sides know the names, so none travel on the wire):

* ``none``  -- one float32 tensor per parameter, under the parameter name.
* ``fp16``  -- one float16 tensor per parameter, under the parameter name.
* ``int8``  -- ``::scales`` (float32, one symmetric scale per parameter) and ``::int8``
  (int8, every parameter flattened and concatenated). Decoded value = q * scale.
* ``topk``  -- ``::mask`` (uint8, ``np.packbits`` of one bit per parameter entry over
  all parameters concatenated; padding bits are zero) and ``::values`` (float16, the
  sent entries in mask order, as many as the mask has set bits). Entries not sent are
  zero.

``int8`` and ``topk`` payloads are deflated when that makes them smaller: metadata
``deflate`` is ``"zlib"`` and the only tensor is ``::deflate`` (uint8), the zlib stream
of the little-endian bytes of the tensors above, in the order listed.

The server never trusts a payload: :func:`decode_delta` checks size, codec, names,
shapes, dtypes, indices and finiteness before returning dense float32 arrays, bounds
the inflated size by what the expected layout allows, and every rejection is a
:class:`WireError` with a machine-readable ``code``.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

__all__ = [
    "CODECS",
    "CODEC_VERSION",
    "EncodedDelta",
    "WireError",
    "clip_by_norm",
    "decode_delta",
    "decode_tensors",
    "encode_delta",
    "encode_tensors",
    "expected_layout",
    "l2_norm",
]

CODEC_VERSION = 2
CODECS = ("none", "fp16", "int8", "topk")

# Separator between a parameter name and the part of a top-k payload it carries.
# PyTorch parameter names use dots, never "::", so the split is unambiguous.
_SEP = "::"
# The safetensors format itself caps the JSON header at 100 MB; a header that large is
# never legitimate for a delta, and parsing it would be an easy way to burn memory.
_MAX_HEADER_BYTES = 100_000_000
_FP16_MAX = float(np.finfo(np.float16).max)
# zlib level 6 is the usual size/CPU balance; the payloads are tens of KB at most.
_DEFLATE_LEVEL = 6
_SCALES = f"{_SEP}scales"
_INT8 = f"{_SEP}int8"
_MASK = f"{_SEP}mask"
_VALUES = f"{_SEP}values"
_DEFLATE = f"{_SEP}deflate"
# Little-endian wire dtypes of the packed parts, in the order they are concatenated.
_PACKED_PARTS: dict[str, tuple[tuple[str, str, np.dtype[Any]], ...]] = {
    "int8": ((_SCALES, "F32", np.dtype("<f4")), (_INT8, "I8", np.dtype("i1"))),
    "topk": ((_MASK, "U8", np.dtype("u1")), (_VALUES, "F16", np.dtype("<f2"))),
}

_WIRE_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}

Tensors = dict[str, npt.NDArray[np.float32]]


class WireError(ValueError):
    """A payload that cannot be accepted.

    ``code`` is a stable machine-readable reason (``non_finite``, ``shape_mismatch``,
    ``dtype_mismatch``, ``unknown_tensor``, ``missing_tensor``, ``too_large``,
    ``truncated``, ``malformed``, ``bad_codec``, ``bad_index``, ``bad_scale``);
    ``tensor`` names the offending tensor when there is one.
    """

    def __init__(self, code: str, message: str, *, tensor: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.tensor = tensor

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class EncodedDelta:
    """An encoded delta ready to send.

    ``raw_bytes`` is the float32 size of the delta, so ``len(data) / raw_bytes`` is the
    compression ratio. ``residual`` is the new error-feedback residual for ``topk``
    (what was not sent, plus the float16 rounding error of what was, to be added to the
    next delta) and ``None`` for other codecs.
    """

    data: bytes
    codec: str
    raw_bytes: int
    residual: Tensors | None


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Entry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _parse_header(data: bytes) -> tuple[dict[str, _Entry], dict[str, str], int]:
    """Parse and check the safetensors header without touching the tensor bytes.

    Returns the entries, the metadata and the offset where the byte buffer starts.
    """
    if len(data) < 8:
        raise WireError("truncated", f"payload is {len(data)} bytes, shorter than a header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > _MAX_HEADER_BYTES:
        raise WireError("malformed", f"header length {header_len} is implausibly large")
    if 8 + header_len > len(data):
        raise WireError(
            "truncated",
            f"header says {header_len} bytes but only {len(data) - 8} follow",
        )
    try:
        header = json.loads(data[8 : 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError("malformed", f"header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise WireError("malformed", "header is not a JSON object")

    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise WireError("malformed", "metadata must map strings to strings")
    metadata: dict[str, str] = dict(raw_meta)

    buffer_len = len(data) - 8 - header_len
    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WireError("malformed", f"bad header entry for {name!r}", tensor=name) from None
        if any(d < 0 for d in shape) or begin < 0 or end < begin:
            raise WireError("malformed", f"bad shape or offsets for {name!r}", tensor=name)
        if end > buffer_len:
            raise WireError(
                "truncated",
                f"tensor {name!r} ends at byte {end} but the buffer has {buffer_len}",
                tensor=name,
            )
        entries[name] = _Entry(dtype=dtype, shape=shape, begin=begin, end=end)
    return entries, metadata, 8 + header_len


def _load(data: bytes) -> dict[str, np.ndarray[Any, Any]]:
    try:
        loaded: dict[str, np.ndarray[Any, Any]] = st_load(data)
    except SafetensorError as exc:
        raise WireError("malformed", f"safetensors rejected the payload: {exc}") from None
    return loaded


def _as_f32(array: npt.ArrayLike, *, name: str) -> npt.NDArray[np.float32]:
    out = np.ascontiguousarray(array, dtype=np.float32)
    if not np.issubdtype(np.asarray(array).dtype, np.floating):
        raise TypeError(f"tensor {name!r} must be floating point")
    return out


def _raw_bytes(tensors: Mapping[str, np.ndarray[Any, Any]]) -> int:
    return sum(int(t.size) * 4 for t in tensors.values())


# --------------------------------------------------------------------------- weights


def encode_tensors(
    tensors: Mapping[str, npt.ArrayLike], *, metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise plain tensors (model weights) to safetensors bytes.

    Arrays are written as given (made C-contiguous); float weights should be float32.
    """
    # asarray(order="C"), not ascontiguousarray, which turns a scalar into shape (1,).
    arrays = {name: np.asarray(t, order="C") for name, t in tensors.items()}
    data: bytes = st_save(arrays, metadata=dict(metadata) if metadata else None)
    return data


def decode_tensors(data: bytes) -> tuple[dict[str, np.ndarray[Any, Any]], dict[str, str]]:
    """Parse safetensors bytes into ``(tensors, metadata)``.

    Raises :class:`WireError` (``truncated`` or ``malformed``) on bytes that are not a
    complete safetensors payload.
    """
    _, metadata, _ = _parse_header(data)
    return _load(data), metadata


# --------------------------------------------------------------------------- deltas


def encode_delta(
    delta: Mapping[str, npt.ArrayLike],
    *,
    codec: str,
    topk_fraction: float = 0.1,
    residual: Mapping[str, npt.ArrayLike] | None = None,
) -> EncodedDelta:
    """Encode a model delta with one of :data:`CODECS`.

    For ``topk`` the previous ``residual`` (error feedback) is added to the delta before
    the largest ``topk_fraction`` of entries by magnitude is selected per tensor; what is
    not sent becomes the returned ``EncodedDelta.residual``. The device must keep it and
    pass it to the next call, so nothing is lost over rounds, only delayed.
    """
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected one of {CODECS}")
    for name in delta:
        if _SEP in name:
            raise ValueError(f"tensor name {name!r} must not contain {_SEP!r}")
    dense = {name: _as_f32(t, name=name) for name, t in delta.items()}
    for name, t in dense.items():
        # Fail on the device with a clear message rather than have the server reject it.
        if not bool(np.isfinite(t).all()):
            raise ValueError(f"tensor {name!r} holds NaN or Inf")
        if codec == "fp16" and t.size and float(np.abs(t).max()) > _FP16_MAX:
            raise ValueError(f"tensor {name!r} exceeds the float16 range; use int8 or none")
    metadata = {"codec": codec, "codec_version": str(CODEC_VERSION)}
    raw = _raw_bytes(dense)

    if codec == "none":
        return EncodedDelta(st_save(dense, metadata=metadata), codec, raw, None)

    if codec == "fp16":
        halves = {name: t.astype(np.float16) for name, t in dense.items()}
        return EncodedDelta(st_save(halves, metadata=metadata), codec, raw, None)

    if codec == "int8":
        names = sorted(dense)
        scales = np.empty(len(names), dtype=np.float32)
        parts: list[np.ndarray[Any, Any]] = []
        for i, name in enumerate(names):
            t = dense[name]
            peak = np.float32(np.max(np.abs(t))) if t.size else np.float32(0.0)
            # Symmetric per-tensor scale: +-peak maps to +-127 so the rounding error is
            # at most scale/2. The scale travels as float32, so it is computed in float32;
            # an all-zero tensor, or one so tiny that peak/127 underflows, still gets a
            # positive scale so the decoder can insist on scale > 0.
            scale = peak / np.float32(127.0)
            if not scale > 0:
                scale = np.float32(1.0) if peak == 0 else np.finfo(np.float32).smallest_subnormal
            # Only the subnormal fallback scale can overflow here; clipping saturates it.
            with np.errstate(over="ignore"):
                q = np.rint(t.ravel() / scale)
            parts.append(np.clip(q, -127, 127).astype(np.int8))
            scales[i] = scale
        flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.int8)
        data = _pack(codec, {_SCALES: scales, _INT8: flat}, metadata)
        return EncodedDelta(data, codec, raw, None)

    # topk with error feedback
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError("topk_fraction must be in (0, 1]")
    if residual is not None and set(residual) != set(dense):
        raise ValueError("residual must hold exactly the delta's tensors")
    masks: list[npt.NDArray[np.bool_]] = []
    sent: list[npt.NDArray[np.float16]] = []
    new_residual: Tensors = {}
    for name in sorted(dense):
        t = dense[name]
        corrected = t.ravel().copy()
        if residual is not None:
            r = _as_f32(residual[name], name=name)
            if r.shape != t.shape:
                raise ValueError(f"residual for {name!r} has shape {r.shape}, not {t.shape}")
            corrected += r.ravel()
        k = min(corrected.size, max(1, math.ceil(topk_fraction * corrected.size)))
        if corrected.size == 0:
            idx = np.empty(0, dtype=np.int64)
        elif k == corrected.size:
            idx = np.arange(corrected.size)
        else:
            idx = np.argpartition(np.abs(corrected), corrected.size - k)[corrected.size - k :]
            idx.sort()
        with np.errstate(over="ignore"):
            kept = corrected[idx].astype(np.float16)
        if not bool(np.isfinite(kept).all()):
            raise ValueError(f"tensor {name!r} exceeds the float16 range; use int8 or none")
        # The residual is taken against what the server will decode, so the float16
        # rounding error is carried to the next round instead of being lost. The
        # subtraction is exact (Sterbenz: the float16 value is within a factor 2).
        corrected[idx] -= kept.astype(np.float32)
        mask = np.zeros(corrected.size, dtype=np.bool_)
        mask[idx] = True
        masks.append(mask)
        sent.append(kept)
        new_residual[name] = corrected.reshape(t.shape)
    bitmap = np.packbits(np.concatenate(masks)) if masks else np.empty(0, dtype=np.uint8)
    values = np.concatenate(sent) if sent else np.empty(0, dtype=np.float16)
    data = _pack(codec, {_MASK: bitmap, _VALUES: values}, metadata)
    return EncodedDelta(data, codec, raw, new_residual)


def _pack(codec: str, parts: dict[str, np.ndarray[Any, Any]], metadata: dict[str, str]) -> bytes:
    """Save the parts as safetensors, or their deflated bytes when that is smaller."""
    plain: bytes = st_save(parts, metadata=metadata)
    body = b"".join(
        np.ascontiguousarray(parts[name], dtype=dtype).tobytes() for name, _, dtype in _PACKED_PARTS[codec]
    )
    stream = np.frombuffer(zlib.compress(body, _DEFLATE_LEVEL), dtype=np.uint8)
    deflated: bytes = st_save({_DEFLATE: stream}, metadata={**metadata, "deflate": "zlib"})
    return deflated if len(deflated) < len(plain) else plain


def expected_layout(
    weights: Mapping[str, npt.ArrayLike],
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The ``expected`` argument of :func:`decode_delta` for a model's weights."""
    return {name: (tuple(np.shape(t)), "float32") for name, t in weights.items()}


def _check_names(entries: Mapping[str, _Entry], wanted: list[str], owner: Mapping[str, str]) -> None:
    for wire_name in entries:
        if wire_name not in owner:
            raise WireError("unknown_tensor", f"tensor {wire_name!r} is not in the model", tensor=wire_name)
    for wire_name in wanted:
        if wire_name not in entries:
            raise WireError("missing_tensor", f"tensor {wire_name!r} is missing", tensor=owner[wire_name])


def _check_entry(
    entry: _Entry, *, wire_name: str, codec: str, dtype: str, shape: tuple[int, ...] | None
) -> None:
    """Check one wire tensor's shape (``None``: any 1-D length) and dtype."""
    if shape is None:
        if len(entry.shape) != 1:
            raise WireError("shape_mismatch", f"tensor {wire_name!r} must be 1-D", tensor=wire_name)
    elif entry.shape != shape:
        raise WireError(
            "shape_mismatch",
            f"tensor {wire_name!r} has shape {list(entry.shape)}, expected {list(shape)}",
            tensor=wire_name,
        )
    if entry.dtype != dtype:
        raise WireError(
            "dtype_mismatch",
            f"tensor {wire_name!r} is {entry.dtype}, codec {codec} sends {dtype}",
            tensor=wire_name,
        )


def _inflate(stream: bytes, *, limit: int) -> bytes:
    """Inflate a zlib stream, refusing to produce more than ``limit`` bytes.

    The limit comes from the expected layout, so a small compressed bomb cannot make
    the server allocate more than a legitimate payload would.
    """
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(stream, limit + 1)
    except zlib.error as exc:
        raise WireError("malformed", f"deflated payload is not a valid zlib stream: {exc}") from None
    if len(body) > limit or inflater.unconsumed_tail:
        raise WireError("too_large", f"deflated payload inflates past the {limit} bytes the model allows")
    if not inflater.eof:
        raise WireError("truncated", "deflated payload ends before the zlib stream does")
    if inflater.unused_data:
        raise WireError("malformed", "bytes follow the end of the zlib stream")
    return body


def _packed_parts(
    codec: str,
    data: bytes,
    *,
    entries: Mapping[str, _Entry],
    metadata: Mapping[str, str],
    start: int,
    first_len: int,
    total: int,
) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """The two parts of an ``int8`` or ``topk`` payload, plain or deflated.

    ``first_len`` is the exact length of the first part (scales or mask); the second
    part (int8 values or float16 values) holds at most ``total`` entries.
    """
    (first, first_dtype, first_np), (second, second_dtype, second_np) = _PACKED_PARTS[codec]
    deflate = metadata.get("deflate")
    if deflate is None:
        _check_names(entries, [first, second], {first: first, second: second})
        _check_entry(entries[first], wire_name=first, codec=codec, dtype=first_dtype, shape=(first_len,))
        second_shape = (total,) if codec == "int8" else None
        _check_entry(entries[second], wire_name=second, codec=codec, dtype=second_dtype, shape=second_shape)
        raw = _load(data)
        return raw[first], raw[second]
    if deflate != "zlib":
        raise WireError("bad_codec", f"unknown deflate {deflate!r}; only 'zlib' is supported")
    _check_names(entries, [_DEFLATE], {_DEFLATE: _DEFLATE})
    entry = entries[_DEFLATE]
    _check_entry(entry, wire_name=_DEFLATE, codec=codec, dtype="U8", shape=None)
    first_bytes = first_len * first_np.itemsize
    body = _inflate(
        data[start + entry.begin : start + entry.end], limit=first_bytes + total * second_np.itemsize
    )
    if len(body) < first_bytes:
        raise WireError("truncated", f"inflated payload is {len(body)} bytes, shorter than {first}")
    rest = len(body) - first_bytes
    if codec == "int8" and rest != total:
        raise WireError("truncated", f"inflated payload has {rest} int8 values, expected {total}")
    if rest % second_np.itemsize:
        raise WireError("malformed", f"inflated {second} is not a whole number of {second_dtype}")
    head = np.frombuffer(body, dtype=first_np, count=first_len)
    tail = np.frombuffer(body, dtype=second_np, offset=first_bytes)
    return head, tail


def decode_delta(
    data: bytes,
    *,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    max_bytes: int | None = None,
) -> Tensors:
    """Validate and decode a delta payload into dense float32 arrays.

    ``expected`` maps every parameter name to ``(shape, dtype)`` of the global model;
    only ``"float32"`` parameters are supported. Checks, in order: size limit (before
    any inflating), header integrity, codec and version, tensor names (none missing,
    none extra), shapes, wire dtypes for the declared codec, inflated size, int8 scales,
    top-k bitmap against the values count, finiteness. Any failure raises
    :class:`WireError`, naming the tensor where there is one.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError("too_large", f"payload is {len(data)} bytes, limit is {max_bytes}")
    for name, (_, dtype) in expected.items():
        if np.dtype(dtype) != np.float32:
            raise ValueError(f"expected dtype for {name!r} is {dtype}; only float32 is supported")

    entries, metadata, start = _parse_header(data)

    codec = metadata.get("codec")
    version = metadata.get("codec_version")
    if codec not in CODECS:
        raise WireError("bad_codec", f"unknown codec {codec!r}; expected one of {CODECS}")
    if version != str(CODEC_VERSION):
        raise WireError("bad_codec", f"codec version {version!r} is not supported (want {CODEC_VERSION})")

    names = sorted(expected)
    shapes = {name: tuple(expected[name][0]) for name in names}
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(sizes.values())
    out: Tensors = {}

    if codec in ("none", "fp16"):
        if "deflate" in metadata:
            raise WireError("bad_codec", f"codec {codec} is never deflated")
        _check_names(entries, names, {name: name for name in names})
        want = "F32" if codec == "none" else "F16"
        for name in names:
            _check_entry(entries[name], wire_name=name, codec=codec, dtype=want, shape=shapes[name])
        raw = _load(data)
        for name in expected:
            out[name] = np.ascontiguousarray(raw[name], dtype=np.float32).reshape(shapes[name])
    elif codec == "int8":
        scales, q = _packed_parts(
            codec, data, entries=entries, metadata=metadata, start=start, first_len=len(names), total=total
        )
        offset = 0
        for i, name in enumerate(names):
            scale = float(scales[i])
            if not math.isfinite(scale) or scale <= 0:
                raise WireError("bad_scale", f"int8 scale for {name!r} is {scale!r}", tensor=name)
            part = q[offset : offset + sizes[name]]
            offset += sizes[name]
            # A finite but huge scale overflows to Inf here; the finiteness check below
            # turns that into a rejection, so the warning itself is noise.
            with np.errstate(over="ignore"):
                out[name] = (part.astype(np.float32) * np.float32(scale)).reshape(shapes[name])
    else:
        bitmap, values = _packed_parts(
            codec,
            data,
            entries=entries,
            metadata=metadata,
            start=start,
            first_len=(total + 7) // 8,
            total=total,
        )
        bits = np.unpackbits(bitmap)
        if bool(bits[total:].any()):
            raise WireError("bad_index", "top-k bitmap sets padding bits past the last parameter")
        mask = bits[:total].astype(np.bool_)
        population = int(np.count_nonzero(mask))
        if population != values.size:
            raise WireError(
                "bad_index", f"top-k bitmap marks {population} entries but {values.size} values were sent"
            )
        flat = np.zeros(total, dtype=np.float32)
        flat[mask] = values.astype(np.float32)
        offset = 0
        for name in names:
            out[name] = flat[offset : offset + sizes[name]].reshape(shapes[name])
            offset += sizes[name]

    for name in names:
        if not bool(np.all(np.isfinite(out[name]))):
            raise WireError("non_finite", f"tensor {name!r} holds NaN or Inf", tensor=name)
    return {name: np.ascontiguousarray(out[name], dtype=np.float32) for name in expected}


# --------------------------------------------------------------------------- clipping


def l2_norm(tensors: Mapping[str, npt.ArrayLike]) -> float:
    """Global L2 norm over all tensors, accumulated in float64."""
    total = 0.0
    for t in tensors.values():
        flat = np.asarray(t, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip_by_norm(tensors: Mapping[str, npt.ArrayLike], *, max_norm: float) -> tuple[Tensors, float]:
    """Scale all tensors together so their global L2 norm is at most ``max_norm``.

    Returns ``(clipped, scale)`` where ``scale`` <= 1 is the factor applied. This is the
    client-side clipping that bounds each device's contribution for differential privacy.
    """
    if not max_norm > 0:
        raise ValueError("max_norm must be positive")
    norm = l2_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError("cannot clip tensors holding NaN or Inf")
    scale = 1.0 if norm <= max_norm else max_norm / norm
    clipped = {
        name: (np.asarray(t, dtype=np.float64) * scale).astype(np.float32) for name, t in tensors.items()
    }
    return clipped, scale
