"""Tensor and delta codecs shared byte for byte by the agent and the server.

Weights and deltas travel as safetensors (never pickle). A model state is a
``dict[str, np.ndarray]`` of float32 arrays.

Delta payload layout (safetensors metadata ``codec`` and ``codec_version`` always set):

* ``none``  -- one float32 tensor per parameter, under the parameter name.
* ``fp16``  -- one float16 tensor per parameter, under the parameter name.
* ``int8``  -- one int8 tensor per parameter, under the parameter name; the per-tensor
  symmetric scale is in the metadata key ``scales`` (JSON object name -> float).
  Decoded value = q * scale.
* ``topk``  -- per parameter two 1-D tensors ``<name>::indices`` (int32, strictly
  increasing flat indices) and ``<name>::values`` (float32); the dense shape is in the
  metadata key ``shapes`` (JSON object name -> list of ints). Entries not sent are zero.

The server never trusts a payload: :func:`decode_delta` checks size, codec, names,
shapes, dtypes, indices and finiteness before returning dense float32 arrays, and every
rejection is a :class:`WireError` with a machine-readable ``code``.
"""

from __future__ import annotations

import json
import math
import struct
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

CODEC_VERSION = 1
CODECS = ("none", "fp16", "int8", "topk")

# Separator between a parameter name and the part of a top-k payload it carries.
# PyTorch parameter names use dots, never "::", so the split is unambiguous.
_SEP = "::"
# The safetensors format itself caps the JSON header at 100 MB; a header that large is
# never legitimate for a delta, and parsing it would be an easy way to burn memory.
_MAX_HEADER_BYTES = 100_000_000
_FP16_MAX = float(np.finfo(np.float16).max)

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
    (what was not sent, to be added to the next delta) and ``None`` for other codecs.
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
    arrays = {name: np.ascontiguousarray(t) for name, t in tensors.items()}
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
        quantised: dict[str, np.ndarray[Any, Any]] = {}
        scales: dict[str, float] = {}
        for name, t in dense.items():
            peak = float(np.max(np.abs(t))) if t.size else 0.0
            # Symmetric per-tensor scale: +-peak maps to +-127 so the rounding error is
            # at most scale/2. An all-zero tensor still gets a positive scale so the
            # decoder can insist on scale > 0.
            scale = peak / 127.0 if peak > 0 else 1.0
            q = np.rint(t / np.float32(scale))
            quantised[name] = np.clip(q, -127, 127).astype(np.int8)
            scales[name] = scale
        metadata["scales"] = json.dumps(scales)
        return EncodedDelta(st_save(quantised, metadata=metadata), codec, raw, None)

    # topk with error feedback
    if not 0.0 < topk_fraction <= 1.0:
        raise ValueError("topk_fraction must be in (0, 1]")
    if residual is not None and set(residual) != set(dense):
        raise ValueError("residual must hold exactly the delta's tensors")
    payload: dict[str, np.ndarray[Any, Any]] = {}
    shapes: dict[str, list[int]] = {}
    new_residual: Tensors = {}
    for name, t in dense.items():
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
        values = corrected[idx]
        corrected[idx] = 0.0
        payload[f"{name}{_SEP}indices"] = idx.astype(np.int32)
        payload[f"{name}{_SEP}values"] = values.astype(np.float32)
        shapes[name] = list(t.shape)
        new_residual[name] = corrected.reshape(t.shape)
    metadata["shapes"] = json.dumps(shapes)
    return EncodedDelta(st_save(payload, metadata=metadata), codec, raw, new_residual)


def _wire_names(codec: str, names: list[str]) -> dict[str, tuple[str, str]]:
    """Map each tensor name expected on the wire to (parameter name, role)."""
    if codec == "topk":
        wire: dict[str, tuple[str, str]] = {}
        for name in names:
            wire[f"{name}{_SEP}indices"] = (name, "indices")
            wire[f"{name}{_SEP}values"] = (name, "values")
        return wire
    return {name: (name, "dense") for name in names}


def _json_meta(metadata: Mapping[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata[key])
    except KeyError:
        raise WireError("malformed", f"metadata key {key!r} is missing") from None
    except json.JSONDecodeError:
        raise WireError("malformed", f"metadata key {key!r} is not valid JSON") from None
    if not isinstance(value, dict):
        raise WireError("malformed", f"metadata key {key!r} must be a JSON object")
    return value


def expected_layout(
    weights: Mapping[str, npt.ArrayLike],
) -> dict[str, tuple[tuple[int, ...], str]]:
    """The ``expected`` argument of :func:`decode_delta` for a model's weights."""
    return {name: (tuple(np.shape(t)), "float32") for name, t in weights.items()}


def decode_delta(
    data: bytes,
    *,
    expected: Mapping[str, tuple[tuple[int, ...], str]],
    max_bytes: int | None = None,
) -> Tensors:
    """Validate and decode a delta payload into dense float32 arrays.

    ``expected`` maps every parameter name to ``(shape, dtype)`` of the global model;
    only ``"float32"`` parameters are supported. Checks, in order: size limit, header
    integrity, codec and version, tensor names (none missing, none extra), shapes, wire
    dtypes for the declared codec, int8 scales, top-k indices, finiteness. Any failure
    raises :class:`WireError` naming the tensor.
    """
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError("too_large", f"payload is {len(data)} bytes, limit is {max_bytes}")
    for name, (_, dtype) in expected.items():
        if np.dtype(dtype) != np.float32:
            raise ValueError(f"expected dtype for {name!r} is {dtype}; only float32 is supported")

    entries, metadata, _ = _parse_header(data)

    codec = metadata.get("codec")
    version = metadata.get("codec_version")
    if codec not in CODECS:
        raise WireError("bad_codec", f"unknown codec {codec!r}; expected one of {CODECS}")
    if version != str(CODEC_VERSION):
        raise WireError("bad_codec", f"codec version {version!r} is not supported (want {CODEC_VERSION})")

    wire = _wire_names(codec, list(expected))
    for wire_name in entries:
        if wire_name not in wire:
            raise WireError("unknown_tensor", f"tensor {wire_name!r} is not in the model", tensor=wire_name)
    for wire_name, (name, _) in wire.items():
        if wire_name not in entries:
            raise WireError("missing_tensor", f"tensor {wire_name!r} is missing", tensor=name)

    want_dtype = {"none": "F32", "fp16": "F16", "int8": "I8"}
    shapes_meta = _json_meta(metadata, "shapes") if codec == "topk" else {}
    for wire_name, entry in entries.items():
        name, role = wire[wire_name]
        shape = tuple(expected[name][0])
        if role == "dense":
            want = want_dtype[codec]
            if entry.shape != shape:
                raise WireError(
                    "shape_mismatch",
                    f"tensor {name!r} has shape {list(entry.shape)}, expected {list(shape)}",
                    tensor=name,
                )
        else:
            want = "I32" if role == "indices" else "F32"
            declared = shapes_meta.get(name)
            if not isinstance(declared, list) or tuple(declared) != shape:
                raise WireError(
                    "shape_mismatch",
                    f"tensor {name!r} declares shape {declared}, expected {list(shape)}",
                    tensor=name,
                )
            if len(entry.shape) != 1:
                raise WireError("shape_mismatch", f"top-k part {wire_name!r} must be 1-D", tensor=name)
        if entry.dtype != want:
            raise WireError(
                "dtype_mismatch",
                f"tensor {wire_name!r} is {entry.dtype}, codec {codec} sends {want}",
                tensor=name,
            )

    scales: dict[str, Any] = _json_meta(metadata, "scales") if codec == "int8" else {}
    raw = _load(data)
    out: Tensors = {}
    for name, (shape_list, _) in expected.items():
        shape = tuple(shape_list)
        if codec == "none":
            dense = np.asarray(raw[name], dtype=np.float32)
        elif codec == "fp16":
            dense = raw[name].astype(np.float32)
        elif codec == "int8":
            scale = scales.get(name)
            if (
                not isinstance(scale, int | float)
                or isinstance(scale, bool)
                or not math.isfinite(scale)
                or scale <= 0
            ):
                raise WireError("bad_scale", f"int8 scale for {name!r} is {scale!r}", tensor=name)
            # A finite but huge scale overflows to Inf here; the finiteness check below
            # turns that into a rejection, so the warning itself is noise.
            with np.errstate(over="ignore"):
                dense = raw[name].astype(np.float32) * np.float32(scale)
        else:
            idx = raw[f"{name}{_SEP}indices"]
            values = raw[f"{name}{_SEP}values"]
            size = math.prod(shape)
            if idx.shape != values.shape:
                raise WireError(
                    "shape_mismatch",
                    f"top-k for {name!r} has {idx.size} indices but {values.size} values",
                    tensor=name,
                )
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size):
                raise WireError(
                    "bad_index", f"top-k index out of range [0, {size}) for {name!r}", tensor=name
                )
            # Strictly increasing rules out duplicates, which would silently drop values.
            if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
                raise WireError(
                    "bad_index",
                    f"top-k indices for {name!r} are not strictly increasing",
                    tensor=name,
                )
            flat = np.zeros(size, dtype=np.float32)
            flat[idx] = values
            dense = flat.reshape(shape)
        if not bool(np.all(np.isfinite(dense))):
            raise WireError("non_finite", f"tensor {name!r} holds NaN or Inf", tensor=name)
        out[name] = np.ascontiguousarray(dense.reshape(shape), dtype=np.float32)
    return out


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
