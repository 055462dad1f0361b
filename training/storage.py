"""Where round files live: global weights, client deltas, partial sums, optimiser state.

Everything goes through Django's default storage (filesystem by default, S3-compatible
when configured). Aggregation reads deltas from local files, so for a
remote storage a file is copied to a local temporary first.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage


def round_dir(*, job_id: int, round_number: int) -> str:
    """Storage prefix of one round's files."""
    return f"federated/job_{job_id}/round_{round_number:04d}"


def save_bytes(*, name: str, data: bytes) -> str:
    """Write ``data`` under ``name`` (replacing any file there); returns the stored name."""
    # Replacing, not renaming: a retried task writes the same name again and the row
    # that points at it must stay valid.
    if default_storage.exists(name):
        default_storage.delete(name)
    stored: str = default_storage.save(name, ContentFile(data))
    return stored


def read_bytes(*, name: str) -> bytes:
    """The whole content of a stored file."""
    with default_storage.open(name, "rb") as handle:
        data: bytes = handle.read()
    return data


def delete_quietly(*, name: str) -> None:
    """Delete a stored file if it is there."""
    if name and default_storage.exists(name):
        default_storage.delete(name)


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


@contextmanager
def local_paths(*, names: list[str]) -> Iterator[list[str]]:
    """Local filesystem paths for stored files, copied to a temporary dir if remote."""
    try:
        paths = [default_storage.path(n) for n in names]
    except NotImplementedError:
        paths = []
    if paths:
        yield paths
        return
    tmp = tempfile.mkdtemp(prefix="flotilla-round-")
    try:
        local: list[str] = []
        for i, name in enumerate(names):
            target = os.path.join(tmp, f"{i}.safetensors")
            with default_storage.open(name, "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            local.append(target)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
