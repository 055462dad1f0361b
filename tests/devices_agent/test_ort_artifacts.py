"""The ORT training archive (packing, safe unpacking, hostile archives), torch's data order
without torch, and how a board without ONNX Runtime's training build reports backends."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices_agent.ort_artifacts import MEMBERS, ArchiveError, Manifest, pack, read_manifest, unpack

MANIFEST: Manifest = {
    "format": "flotilla-ort-training/1",
    "loss": "cross_entropy",
    "trainable": ["fc.weight", "fc.bias"],
    "input": "input",
    "labels": "labels",
    "outputs": ["onnx::loss::2", "output"],
    "optimizers": {"sgd": "optimizer_sgd.onnx", "adam": "optimizer_adam.onnx"},
    "opset": 17,
    "builder": {"onnxruntime-training-cpu": "1.19.2", "onnx": "1.17.0"},
}


def _folder(tmp_path: Path) -> Path:
    folder = tmp_path / "built"
    folder.mkdir()
    for name in MEMBERS:
        if name != "manifest.json":
            (folder / name).write_bytes(f"bytes of {name}".encode())
    return folder


def _tar(members: Sequence[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb") as compressed,
        tarfile.open(fileobj=compressed, mode="w") as tar,
    ):
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def _member(name: str, data: bytes, **fields: Any) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def _good_members() -> list[tuple[tarfile.TarInfo, bytes | None]]:
    out: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for name in MEMBERS:
        data = json.dumps(MANIFEST).encode() if name == "manifest.json" else b"x"
        out.append(_member(name, data))
    return out


def test_an_archive_packs_the_same_bytes_every_time_and_unpacks_to_its_members(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    first = pack(folder, MANIFEST)
    assert pack(folder, MANIFEST) == first  # content-addressed: the digest must not move
    assert read_manifest(first) == MANIFEST
    out = tmp_path / "out"
    assert unpack(first, out) == MANIFEST
    assert sorted(p.name for p in out.iterdir()) == sorted(MEMBERS)
    assert (out / "checkpoint").read_bytes() == b"bytes of checkpoint"


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (lambda good: [*good, _member("../../etc/evil", b"x")], "unexpected member"),
        (lambda good: [_member("/abs/checkpoint", b"x"), *good], "unexpected member"),
        (lambda good: good[1:], "lacks"),
        (lambda good: [*good, _member("checkpoint", b"again")], "appears twice"),
        (
            lambda good: [
                _member("checkpoint", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd"),
                *good[1:],
            ],
            "not a plain file",
        ),
    ],
    ids=["traversal", "absolute", "missing", "duplicate", "symlink"],
)
def test_a_hostile_archive_is_refused_and_nothing_is_written_outside(
    tmp_path: Path, members: Any, message: str
) -> None:
    good = _good_members()
    ordered = [m for m in good if m[0].name != "checkpoint"]
    checkpoint = [m for m in good if m[0].name == "checkpoint"]
    data = _tar(members(checkpoint + ordered))
    with pytest.raises(ArchiveError, match=message):
        unpack(data, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not (tmp_path.parent / "etc").exists()


def test_a_manifest_that_is_not_the_format_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    with pytest.raises(ArchiveError, match="format"):
        pack(folder, {**MANIFEST, "format": "something/2"})
    bad = [
        _member(info.name, b"{not json" if info.name == "manifest.json" else (data or b""))
        for info, data in _good_members()
    ]
    with pytest.raises(ArchiveError, match="not JSON"):
        read_manifest(_tar(bad))
    wrong_optimizer = [
        _member(
            info.name,
            json.dumps({**MANIFEST, "optimizers": {"sgd": "../../x.onnx"}}).encode()
            if info.name == "manifest.json"
            else (data or b""),
        )
        for info, data in _good_members()
    ]
    with pytest.raises(ArchiveError, match="optimizers"):
        read_manifest(_tar(wrong_optimizer))
    with pytest.raises(ArchiveError, match="gzip"):
        read_manifest(b"PK\x03\x04 a zip, not a tar")


def test_the_data_order_without_torch_is_torchs() -> None:
    import torch

    from devices_agent.backends.order import epoch_orders

    for n, seed in [(1, 3), (2, 7), (33, 0), (500, 123_456_789), (1000, 2**31 - 2)]:
        generator = torch.Generator().manual_seed(seed)
        orders = epoch_orders(n, seed)
        for _ in range(3):
            assert np.array_equal(next(orders), torch.randperm(n, generator=generator).numpy()), (n, seed)


def test_a_board_without_the_training_build_does_not_report_ort() -> None:
    from devices_agent.backends import available_backends, get_backend

    # The server's environment has the inference-only onnxruntime.
    assert "ort" not in available_backends()
    with pytest.raises(ValueError, match="onnxruntime-training-cpu"):
        get_backend("ort")
