"""Checking uploaded model files before they are stored: safetensors weights and ONNX models.

Everything here reads files from disk (uploads are spooled to a temporary file first), so
a large upload is never held in memory as a whole for validation. Pickle in any form is
refused outright: loading it runs arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from rest_framework import status

from core.api import ServiceError
from devices_agent.family import FamilySpec

__all__ = [
    "Spooled",
    "check_not_pickle",
    "spool",
    "validate_onnx",
    "validate_safetensors",
]

_CHUNK = 1024 * 1024
# Float dtypes a weights file may hold; integer tensors are not trainable parameters.
# Float dtypes numpy (and so the agent) can read; bfloat16 has no numpy type.
_FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2}
_ALL_DTYPES = {**_FLOAT_DTYPES, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# The format caps its JSON header at 100 MB; a real model's header is a few KB.
_MAX_HEADER = 100_000_000

Source = bytes | IO[bytes] | Any


@dataclass(frozen=True)
class Spooled:
    """An upload copied to a private temporary file, with its digest and size."""

    path: Path
    sha256: str
    size: int


def _chunks(source: Source) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        for start in range(0, len(data), _CHUNK):
            yield data[start : start + _CHUNK]
        return
    if hasattr(source, "seek"):
        with suppress(OSError, ValueError):
            source.seek(0)
    chunks = getattr(source, "chunks", None)
    if callable(chunks):  # Django File / UploadedFile
        yield from chunks(_CHUNK)
        return
    while True:
        block = source.read(_CHUNK)
        if not block:
            return
        yield block


def _hash_file(path: Path, *, field: str, max_bytes: int) -> Spooled:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while block := handle.read(_CHUNK):
            size += len(block)
            if size > max_bytes:
                raise _too_large(field, max_bytes)
            digest.update(block)
    if size == 0:
        raise ServiceError(f"{field} is empty.", code="empty_file", details={"field": field})
    return Spooled(path=path, sha256=digest.hexdigest(), size=size)


def _too_large(field: str, max_bytes: int) -> ServiceError:
    return ServiceError(
        f"{field} is larger than the {max_bytes}-byte upload limit.",
        code="too_large",
        status_code=status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        details={"field": field, "limit": max_bytes},
    )


@contextmanager
def spool(source: Source, *, field: str, max_bytes: int) -> Iterator[Spooled]:
    """Give ``source`` (bytes or a binary file) a path on disk, with its digest and size.

    An upload Django already spooled to a temporary file is hashed where it lies (one
    read, no copy); anything else is copied to a private temporary file while it is
    hashed, and that file is removed on exit. Raises a 413 ``too_large`` ServiceError as
    soon as more than ``max_bytes`` were seen, and 400 ``empty_file`` for an empty upload.
    """
    temporary_path = getattr(source, "temporary_file_path", None)
    if callable(temporary_path):
        yield _hash_file(Path(temporary_path()), field=field, max_bytes=max_bytes)
        return
    fd, name = tempfile.mkstemp(prefix="flotilla-upload-")
    path = Path(name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            for block in _chunks(source):
                size += len(block)
                if size > max_bytes:
                    raise _too_large(field, max_bytes)
                digest.update(block)
                out.write(block)
        if size == 0:
            raise ServiceError(f"{field} is empty.", code="empty_file", details={"field": field})
        yield Spooled(path=path, sha256=digest.hexdigest(), size=size)
    finally:
        path.unlink(missing_ok=True)


def copy_to(spooled: Spooled, target: IO[bytes]) -> None:
    """Write a spooled file's bytes into an open binary file."""
    with spooled.path.open("rb") as handle:
        shutil.copyfileobj(handle, target, _CHUNK)


def _invalid(code: str, message: str, field: str, **details: Any) -> ServiceError:
    return ServiceError(message, code=code, details={"field": field, **details})


def check_not_pickle(path: Path, *, field: str) -> None:
    """Refuse pickle and ``torch.save`` archives (a zip holding ``data.pkl``) by their bytes.

    Protocol 2+ pickles start with the PROTO opcode 0x80; ``torch.save`` writes a zip
    whose members include ``<name>/data.pkl``. Both run code when loaded.
    """
    with path.open("rb") as handle:
        head = handle.read(4)
    message = (
        f"{field} is a Python pickle (torch.save output), which the registry never loads. "
        "Upload weights as safetensors (safetensors.torch.save_file(model.state_dict(), path)) "
        "and inference models as ONNX."
    )
    if head[:1] == b"\x80":
        raise _invalid("pickle_rejected", message, field)
    if head == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except zipfile.BadZipFile:
            names = []
        if any(n == "data.pkl" or n.endswith("/data.pkl") or n.endswith(".pkl") for n in names):
            raise _invalid("pickle_rejected", message, field)


def _read_header(path: Path, size: int, field: str) -> dict[str, Any]:
    bad = f"{field} is not a valid safetensors file"
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _invalid("invalid_safetensors", f"{bad}: too short.", field)
        (length,) = struct.unpack("<Q", prefix)
        if length == 0 or length > _MAX_HEADER or length > size - 8:
            raise _invalid("invalid_safetensors", f"{bad}: header length {length} is impossible.", field)
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _invalid("invalid_safetensors", f"{bad}: the header is not JSON.", field) from None
    if not isinstance(header, dict):
        raise _invalid("invalid_safetensors", f"{bad}: the header is not a JSON object.", field)
    header.pop("__metadata__", None)
    data_size = size - 8 - length
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) < {"dtype", "shape", "data_offsets"}:
            raise _invalid("invalid_safetensors", f"{bad}: tensor {name!r} is malformed.", field)
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ALL_DTYPES:
            raise _invalid("invalid_safetensors", f"{bad}: tensor {name!r} has dtype {dtype!r}.", field)
        # A dimension of zero holds nothing but lets a header claim absurd shapes for free.
        if not (
            isinstance(shape, list) and len(shape) <= 8 and all(isinstance(d, int) and d >= 1 for d in shape)
        ):
            raise _invalid("invalid_safetensors", f"{bad}: tensor {name!r} has shape {shape!r}.", field)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise _invalid("invalid_safetensors", f"{bad}: tensor {name!r} has bad offsets.", field)
        start, end = offsets
        expected = int(np.prod(shape, dtype=np.int64)) * _ALL_DTYPES[dtype]
        if not 0 <= start <= end <= data_size or end - start != expected:
            raise _invalid(
                "invalid_safetensors", f"{bad}: tensor {name!r} does not fit the file (truncated?).", field
            )
        spans.append((start, end))
    # The data region must be covered exactly, with no gaps or overlaps (what the
    # safetensors library itself insists on when loading).
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise _invalid("invalid_safetensors", f"{bad}: tensor data overlaps or leaves gaps.", field)
        position = end
    if position != data_size:
        raise _invalid("invalid_safetensors", f"{bad}: trailing bytes after the tensor data.", field)
    return header


def _check_finite(path: Path, field: str) -> None:
    """Refuse NaN or infinite weights, one tensor at a time (memory-mapped, never the whole file)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            if not np.all(np.isfinite(handle.get_tensor(name))):
                raise ServiceError(
                    f"{field}: tensor {name!r} holds NaN or infinite values.",
                    code="non_finite",
                    details={"field": field, "tensor": name},
                )


def validate_safetensors(path: Path, *, size: int, field: str = "weights") -> dict[str, Any]:
    """Check a weights file: a complete safetensors file of finite tensors with sane shapes.

    The header is parsed first (offsets checked against the file size, no dimension of
    zero), so a malformed file is refused before any tensor is read; then each float
    tensor is checked for NaN and infinities, one at a time. Integer tensors are allowed
    (state such as BatchNorm's step counter); whether the tensors fit the version's
    program is checked against the program. Returns a summary: tensor count, parameter
    count, and each tensor's shape and dtype.
    """
    check_not_pickle(path, field=field)
    header = _read_header(path, size, field)
    if not header:
        raise _invalid("invalid_safetensors", f"{field} holds no tensors.", field)
    unreadable = sorted(n for n, e in header.items() if e["dtype"] == "BF16")
    if unreadable:
        raise _invalid(
            "invalid_weights", f"{field}: bfloat16 tensors cannot be read on the boards: {unreadable}.", field
        )
    _check_finite(path, field)
    shapes = {name: tuple(entry["shape"]) for name, entry in header.items()}
    return {
        "tensors": len(shapes),
        "parameters": int(sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())),
        "shapes": shapes,
        "dtypes": {name: entry["dtype"] for name, entry in header.items()},
    }


def validate_program(
    path: Path,
    *,
    weights: Path,
    onnx: Path | None,
    spec: FamilySpec,
    head: list[str],
    field: str = "program",
) -> dict[str, Any]:
    """Check a trainable program against its weights, the family and the ONNX graph.

    Refused, each with the numbers: a program that would need pickle or run code to
    load, one that does not load, weights that do not match its tensors by name and
    shape (trainable parameters must be float32), an input shape other than the
    family's, outputs other than the family's, an ONNX graph that lacks a parameter as a
    named initializer or disagrees with the program on sample inputs, a head naming
    parameters the program does not have. Returns ``{"parameters", "trainable",
    "operators", "max_abs_diff"}``.
    """
    from devices_agent.codecs import decode_tensors
    from devices_agent.program import (
        ProgramError,
        check_bundle,
        check_state,
        inspect_program,
        program_json_from,
    )

    raw = path.read_bytes()
    if raw[:1] == b"\x80" or _zip_without_program(raw):
        raise _invalid(
            "pickle_rejected",
            f"{field} is a Python pickle or a zip of pickled members (torch.save output, or a "
            "torch.export.save archive without its models/model.json), which the registry never loads; "
            "upload the program's JSON (devices_agent.program.make_bundle writes it).",
            field,
        )
    try:
        program = program_json_from(raw)
        info = inspect_program(program)
        state, _ = decode_tensors(weights.read_bytes())
        check_state(info, state)
    except ProgramError as exc:
        raise ServiceError(exc.message, code=exc.code, details={"field": field, **exc.details}) from None
    not_float = sorted(n for n in info.parameters if np.asarray(state[n]).dtype != np.float32)
    if not_float:
        raise _invalid(
            "invalid_weights", f"trainable parameters must be float32: {not_float[:10]}.", "weights"
        )
    unknown_head = [n for n in head if n not in info.parameters]
    if unknown_head:
        raise _invalid(
            "invalid_head", f"head names parameters the program does not have: {unknown_head}.", "head"
        )
    declared = list(info.input_shape)
    if len(declared) != len(spec.input_shape) or any(
        d is not None and d != w for d, w in zip(declared, spec.input_shape, strict=False)
    ):
        raise ServiceError(
            f"the program takes examples of shape {declared}, the family {list(spec.input_shape)}.",
            code="shape_mismatch",
            details={"field": field, "program": declared, "family": list(spec.input_shape)},
        )
    diff = None
    if onnx is not None:
        try:
            diff, outputs = check_bundle(
                program=program,
                state=state,
                onnx=onnx.read_bytes(),
                input_shape=list(spec.input_shape),
                input_dtype=spec.input_dtype,
            )
        except ProgramError as exc:
            raise ServiceError(exc.message, code=exc.code, details={"field": field, **exc.details}) from None
        except Exception as exc:  # noqa: BLE001 - the graph's own assertions (e.g. a fixed batch size)
            raise _invalid(
                "invalid_program",
                f"the program does not run on a batch of sample inputs: {type(exc).__name__}: {exc}"[:2000]
                + " (export it with a dynamic batch dimension, as make_bundle does)",
                field,
            ) from None
        if outputs != spec.outputs:
            raise ServiceError(
                f"the model returns {outputs} values per example; the family's task needs {spec.outputs}.",
                code="shape_mismatch",
                details={"field": field, "outputs": outputs, "family": spec.outputs},
            )
    return {
        "parameters": list(info.parameters),
        "trainable": int(sum(int(np.prod(s, dtype=np.int64)) for s in info.parameters.values())),
        "operators": list(info.operators),
        "max_abs_diff": diff,
        "program_bytes": program,
    }


def _zip_without_program(raw: bytes) -> bool:
    """A zip archive (torch.save, or torch.export.save stripped of its JSON) with no program in it."""
    if raw[:4] != b"PK\x03\x04":
        return False
    import io

    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as archive:
            names = archive.namelist()
    except zipfile.BadZipFile:
        return False
    return not any(n.endswith("models/model.json") for n in names)


def validate_onnx(path: Path, *, input_shape: list[int] | None, field: str = "onnx") -> dict[str, Any]:
    """Check an ONNX model: parses, passes ``onnx.checker``, loads in ONNX Runtime.

    When ``input_shape`` (one example, no batch axis) is given, the model's first input
    must have it wherever its dimensions are fixed. Returns ``{"opset", "inputs",
    "outputs"}``.
    """
    import onnx
    import onnxruntime as ort

    check_not_pickle(path, field=field)
    try:
        # Never follow external data: its "location" would name a file on this server.
        model = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise _invalid(
            "invalid_onnx", f"{field} is not a valid ONNX model: {str(exc).splitlines()[0][:300]}", field
        ) from None
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    sparse = len(model.graph.sparse_initializer)
    if external or sparse:
        raise _invalid(
            "invalid_onnx",
            f"{field} keeps tensors outside the file ({external[:5]}) or as sparse initializers; "
            "upload a self-contained model.",
            field,
        )
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001 - protobuf and checker raise many types
        raise _invalid(
            "invalid_onnx", f"{field} is not a valid ONNX model: {str(exc).splitlines()[0][:300]}", field
        ) from None
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise _invalid(
            "invalid_onnx",
            f"{field} does not load in ONNX Runtime: {str(exc).splitlines()[0][:300]}",
            field,
        ) from None
    opset = max(
        (int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")),
        default=None,
    )
    inputs = [
        {"name": i.name, "shape": [d if isinstance(d, int) else None for d in i.shape]}
        for i in session.get_inputs()
    ]
    outputs = [
        {"name": o.name, "shape": [d if isinstance(d, int) else None for d in o.shape]}
        for o in session.get_outputs()
    ]
    if input_shape and inputs:
        got = inputs[0]["shape"][1:]
        fits = len(got) == len(input_shape) and all(
            g is None or g == w for g, w in zip(got, input_shape, strict=True)
        )
        if not fits:
            raise ServiceError(
                f"{field}: the model's input has shape {inputs[0]['shape']}, the family expects "
                f"[batch, {', '.join(str(d) for d in input_shape)}].",
                code="shape_mismatch",
                details={"field": field, "input": inputs[0]["shape"], "expected": input_shape},
            )
    return {"opset": opset, "inputs": inputs, "outputs": outputs}
