"""ONNX Runtime training artifacts: the one archive a torch-less board trains a version from.

ONNX Runtime's on-device training does not differentiate a model on the board: it runs
graphs made beforehand from the version's ONNX graph. The server makes them in a pinned
builder environment (``models_registry.ort_training``) and ships them as one signed
artifact of kind ``ort_training``: a gzip'd tar of

- ``training_model.onnx``: forward, loss and gradients (outputs: the loss, then the
  model's output);
- ``eval_model.onnx``: forward and loss (the same outputs, no gradients);
- ``optimizer_sgd.onnx`` and ``optimizer_adam.onnx``: one update step of plain SGD, and
  of Adam with PyTorch's formula (``adam_mode`` 0, no weight decay), so a job's
  ``optimizer`` means the same under both backends;
- ``checkpoint``: the parameters by their PyTorch names, as ORT stores them;
- ``manifest.json`` (:class:`Manifest`): what the graphs take and give, the trainable
  names, the loss, and the builder's versions.

The graphs hold no weights of their own: a board writes the round's global weights into
the checkpoint by name before training, so one archive serves every version whose graph
is the same (all the federated descendants of the version it was built from).

Both sides use this module: the server to pack and check an archive, the board to
unpack it safely (only the members above, plain files, bounded sizes). Pure standard
library.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Literal, TypedDict

__all__ = [
    "FORMAT",
    "MEMBERS",
    "ArchiveError",
    "Manifest",
    "pack",
    "read_manifest",
    "read_manifest_file",
    "unpack",
]

FORMAT = "flotilla-ort-training/1"
MANIFEST = "manifest.json"
GRAPHS = ("training_model.onnx", "eval_model.onnx", "optimizer_sgd.onnx", "optimizer_adam.onnx")
MEMBERS = (*GRAPHS, "checkpoint", MANIFEST)
# What each job optimizer trains with, by member name.
OPTIMIZER_FILES = {"sgd": "optimizer_sgd.onnx", "adam": "optimizer_adam.onnx"}
# Edge models are kilobytes to a few megabytes; the cap keeps a hostile archive from
# filling the board's disk when it is unpacked.
MAX_MEMBER_BYTES = 256 * 1024 * 1024
MAX_MANIFEST_BYTES = 1024 * 1024
# The loss each task trains with (devices_agent.family): cross-entropy on logits, or the
# mean squared error.
LOSSES = {"classification": "cross_entropy", "regression": "mse"}


class ArchiveError(ValueError):
    """An archive that is not a valid set of training artifacts."""

    def __init__(self, message: str, *, code: str = "invalid_ort_artifacts") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class Manifest(TypedDict):
    format: str
    loss: Literal["cross_entropy", "mse"]
    trainable: list[str]  # the parameters the graphs compute gradients for, by PyTorch name
    input: str  # the model's input
    labels: str  # the loss's second input: class indices (int64) or targets (float32)
    outputs: list[str]  # training and eval graph outputs: the loss, then the model's output
    optimizers: dict[str, str]  # job optimizer -> member
    opset: int
    builder: dict[str, str]  # package -> version the graphs were made with


def check_manifest(value: Any) -> Manifest:
    """``value`` as a :class:`Manifest`, or :class:`ArchiveError` naming what is wrong."""
    if not isinstance(value, dict):
        raise ArchiveError("the manifest is not a JSON object")
    if value.get("format") != FORMAT:
        raise ArchiveError(f"the manifest's format is {value.get('format')!r}, not {FORMAT!r}")
    if value.get("loss") not in LOSSES.values():
        raise ArchiveError(f"unknown loss {value.get('loss')!r}")
    trainable = value.get("trainable")
    if not isinstance(trainable, list) or not trainable or not all(isinstance(n, str) for n in trainable):
        raise ArchiveError("the manifest names no trainable parameters")
    outputs = value.get("outputs")
    if not isinstance(outputs, list) or len(outputs) != 2 or not all(isinstance(n, str) for n in outputs):
        raise ArchiveError("the graphs must give two outputs: the loss and the model's output")
    for key in ("input", "labels"):
        if not isinstance(value.get(key), str) or not value[key]:
            raise ArchiveError(f"the manifest has no {key} name")
    optimizers = value.get("optimizers")
    if not isinstance(optimizers, dict) or any(
        OPTIMIZER_FILES.get(str(k)) != v for k, v in optimizers.items()
    ):
        raise ArchiveError("the manifest's optimizers are not the known graphs")
    if not isinstance(value.get("opset"), int) or not isinstance(value.get("builder"), dict):
        raise ArchiveError("the manifest has no opset or builder versions")
    manifest: Manifest = {
        "format": FORMAT,
        "loss": value["loss"],
        "trainable": list(trainable),
        "input": str(value["input"]),
        "labels": str(value["labels"]),
        "outputs": list(outputs),
        "optimizers": {str(k): str(v) for k, v in optimizers.items()},
        "opset": int(value["opset"]),
        "builder": {str(k): str(v) for k, v in value["builder"].items()},
    }
    return manifest


def pack(folder: str | os.PathLike[str], manifest: Manifest) -> bytes:
    """The archive of the graphs and checkpoint in ``folder`` with ``manifest``.

    Members are stored in a fixed order with fixed times and owners (the gzip header's
    time too), so the same files always give the same bytes and the same digest.
    """
    root = Path(folder)
    check_manifest(manifest)
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in MEMBERS:
            data = (
                json.dumps(manifest, indent=2, sort_keys=True).encode()
                if name == MANIFEST
                else (root / name).read_bytes()
            )
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _members(data: bytes) -> dict[str, bytes]:
    """The archive's members by name, every one checked (names, kinds, sizes)."""
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for info in tar:
                if info.name not in MEMBERS:
                    raise ArchiveError(f"unexpected member {info.name[:100]!r} in the archive")
                if not info.isreg():
                    raise ArchiveError(f"member {info.name} is not a plain file")
                if info.name in found:
                    raise ArchiveError(f"member {info.name} appears twice")
                limit = MAX_MANIFEST_BYTES if info.name == MANIFEST else MAX_MEMBER_BYTES
                if info.size > limit:
                    raise ArchiveError(f"member {info.name} is larger than {limit} bytes")
                handle = tar.extractfile(info)
                if handle is None:
                    raise ArchiveError(f"member {info.name} cannot be read")
                found[info.name] = handle.read(limit + 1)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveError(f"not a gzip'd tar archive: {exc}") from None
    missing = [name for name in MEMBERS if name not in found]
    if missing:
        raise ArchiveError(f"the archive lacks {missing}")
    return found


def _manifest_of(raw: bytes) -> Manifest:
    try:
        return check_manifest(json.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, ArchiveError):
            raise
        raise ArchiveError(f"the manifest is not JSON: {exc}") from None


def read_manifest(data: bytes) -> Manifest:
    """The manifest of an archive, after checking every member (nothing is written)."""
    return _manifest_of(_members(data)[MANIFEST])


def read_manifest_file(folder: str | os.PathLike[str]) -> Manifest:
    """The manifest of an archive unpacked into ``folder`` by :func:`unpack`."""
    return _manifest_of((Path(folder) / MANIFEST).read_bytes())


def unpack(data: bytes, folder: str | os.PathLike[str]) -> Manifest:
    """Write the archive's members into ``folder`` (created) and return its manifest.

    Only the known member names are ever written, as plain files directly in
    ``folder``: no path in the archive decides where bytes go.
    """
    members = _members(data)
    manifest = _manifest_of(members[MANIFEST])
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for name, content in members.items():
        tmp = root / f".{name}.tmp"
        tmp.write_bytes(content)
        os.replace(tmp, root / name)
    return manifest
