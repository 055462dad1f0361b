"""On-device personalisation: a personal last layer fine-tuned on the board's own data.

After a new global version is active and its weights are on the board, the
:class:`Personaliser` fine-tunes only the head (see
:func:`devices_agent.local_train.personalise_head`) on the local data, keeps it in
``<state_dir>/personal/head.safetensors`` with ``personal/meta.json`` (base version,
accuracies, how the previous head was carried over), and records two numbers:
``global_accuracy`` and ``personal_accuracy``, measured on the same local held-out split.
Those two numbers are all that leaves the board; the personal weights never do.

When a newer global version arrives the previous head is rebased
(:func:`devices_agent.local_train.rebase_head`): kept as the starting point when its
shapes still fit, reset to the global head otherwise; the outcome is in the metadata.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.client import AgentClient
from devices_agent.codecs import decode_tensors, encode_tensors
from devices_agent.local_train import personalise_head, rebase_head
from devices_agent.updater import download_resumable, verify_artifact
from devices_agent.wire import ArtifactRef

__all__ = ["PersonalResult", "Personaliser", "fetch_global_weights"]

Weights = dict[str, npt.NDArray[np.float32]]
Recorder = Callable[[str, float, int | None], None]


@dataclass(frozen=True)
class PersonalResult:
    """What one personalisation pass produced (the head itself stays on disk)."""

    version_id: int
    global_accuracy: float
    personal_accuracy: float
    # "kept": the previous head fitted the new version and was the starting point;
    # "reset": there was none or its shapes no longer match, so training began from the global head.
    rebase: str

    @property
    def gain(self) -> float:
        """Personal minus global accuracy on the local held-out split."""
        return self.personal_accuracy - self.global_accuracy


def _atomic_write(path: Path, data: bytes) -> None:
    # Write-then-rename so a power cut never leaves a half-written head or metadata file.
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def fetch_global_weights(
    *, client: AgentClient, ref: ArtifactRef, public_key: bytes, folder: Path
) -> Weights:
    """Download a ``weights`` artifact (resumable), verify digest and signature, decode it.

    The verified file is kept as ``<folder>/<sha256>.safetensors`` so a later call for the
    same artifact reads it from disk; older files there are removed, so only the
    latest global weights take space on the board. Raises :class:`devices_agent.updater.VerificationError`
    when the bytes do not match the signed digest.
    """
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{ref['sha256']}.safetensors"
    if not final.exists():
        part = folder / f"{ref['sha256']}.part"
        download_resumable(client=client, url=ref["url"], part=part, expected_size=int(ref["size"]))
        try:
            verify_artifact(part, sha256=ref["sha256"], signature=ref["signature"], public_key=public_key)
        except ValueError:
            part.unlink(missing_ok=True)
            raise
        os.replace(part, final)
        part.with_name(part.name + ".etag").unlink(missing_ok=True)
        for old in folder.glob("*.safetensors"):
            if old != final:
                old.unlink(missing_ok=True)
    tensors, _ = decode_tensors(final.read_bytes())
    return {name: np.asarray(value, dtype=np.float32) for name, value in tensors.items()}


class Personaliser:
    """Keeps a personal head for the active global version on this board's local data."""

    def __init__(
        self,
        *,
        state_dir: Path | str,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        arch: str,
        record: Recorder | None = None,
        epochs: int = 5,
        lr: float = 0.05,
        seed: int = 0,
        holdout_fraction: float = 0.25,
    ) -> None:
        self.folder = Path(state_dir) / "personal"
        self.x = np.asarray(x, dtype=np.float32)
        self.y = np.asarray(y, dtype=np.int64)
        self.arch = arch
        self.record = record
        self.epochs = epochs
        self.lr = lr
        self.seed = seed
        self.holdout_fraction = holdout_fraction

    @property
    def head_path(self) -> Path:
        """Where the personal head lives (never uploaded)."""
        return self.folder / "head.safetensors"

    @property
    def meta_path(self) -> Path:
        """The JSON next to the head: base version id, accuracies, rebase outcome."""
        return self.folder / "meta.json"

    def meta(self) -> dict[str, Any] | None:
        """The stored metadata, or None before the first personalisation."""
        try:
            data = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def load_head(self) -> Weights | None:
        """The stored personal head, or None when there is none (or it is unreadable)."""
        try:
            tensors, _ = decode_tensors(self.head_path.read_bytes())
        except (OSError, ValueError):
            return None
        return {name: np.asarray(value, dtype=np.float32) for name, value in tensors.items()}

    def needs(self, version_id: int) -> bool:
        """Whether the head is not yet personalised for ``version_id``."""
        meta = self.meta()
        return meta is None or meta.get("base_version_id") != version_id

    def personalise(self, *, version_id: int, global_weights: Mapping[str, npt.ArrayLike]) -> PersonalResult:
        """Rebase the previous head onto ``global_weights``, fine-tune, store it, record both accuracies."""
        head, rebase = rebase_head(arch=self.arch, new_global=global_weights, head_weights=self.load_head())
        new_head, global_acc, personal_acc = personalise_head(
            arch=self.arch,
            global_weights=global_weights,
            head_weights=head,
            x=self.x,
            y=self.y,
            epochs=self.epochs,
            lr=self.lr,
            seed=self.seed,
            holdout_fraction=self.holdout_fraction,
            num_threads=1,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.head_path, encode_tensors(new_head, metadata={"base_version_id": str(version_id)}))
        result = PersonalResult(
            version_id=version_id, global_accuracy=global_acc, personal_accuracy=personal_acc, rebase=rebase
        )
        meta = {
            "base_version_id": version_id,
            "arch": self.arch,
            "global_accuracy": global_acc,
            "personal_accuracy": personal_acc,
            "rebase": rebase,
            "examples": int(len(self.y)),
        }
        _atomic_write(self.meta_path, json.dumps(meta, indent=2).encode())
        if self.record is not None:
            self.record("global_accuracy", global_acc, version_id)
            self.record("personal_accuracy", personal_acc, version_id)
        return result
