"""The agent's state directory: credentials, installed models, the current pointer.

Layout (the directory is mode 0700; the credentials file 0600)::

    credentials.json        device id, secret, pinned signing key (written once, atomically)
    state.json              heartbeat seq, deployment in progress, reported deployments
    current.json            {"version_id": ..., "previous_version_id": ...}: the model in use
    models/<version_id>/    model.onnx + meta.json, complete or absent (renamed into place)
    downloads/<sha256>.part the partial download, resumed with HTTP Range
    outbox.sqlite3          metrics not yet acknowledged (see devices_agent.outbox)
    agent.log

Every file that must survive a power cut is written through :func:`atomic_write`
(temp file in the same directory, fsync, rename, fsync of the directory), so a reader
sees either the old contents or the new, never a torn write.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "AgentState",
    "Credentials",
    "InstalledModel",
    "KeyMismatchError",
    "atomic_write",
    "atomic_write_json",
]


class KeyMismatchError(RuntimeError):
    """The server presented a signing key other than the one pinned at enrollment."""


def _fsync_dir(path: Path) -> None:
    # The rename is durable only once the directory entry itself is on disk.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically and durably, with permissions ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates 0600 already; chmod makes other modes explicit before any byte lands.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, value: Any, *, mode: int = 0o600) -> None:
    """:func:`atomic_write` of ``value`` as JSON."""
    atomic_write(path, json.dumps(value, indent=1, sort_keys=True).encode(), mode=mode)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return value


@dataclass(frozen=True)
class Credentials:
    """What enrollment gave the device; the secret never leaves this file and the header."""

    device_id: str
    secret: str
    signing_public_key: str  # base64 of the raw 32-byte Ed25519 key
    server_url: str

    def public_key_bytes(self) -> bytes:
        """The pinned key as 32 raw bytes."""
        return base64.b64decode(self.signing_public_key, validate=True)


@dataclass(frozen=True)
class InstalledModel:
    """A model installed under ``models/<version_id>/``."""

    version_id: int
    path: Path  # the model.onnx file
    meta: dict[str, Any]

    @property
    def label(self) -> str:
        return str(self.meta.get("label", f"v{self.version_id}"))

    @property
    def sha256(self) -> str:
        return str(self.meta.get("sha256", ""))


class AgentState:
    """The state directory of one agent. Safe to share between the threads of one agent."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()
        self._lock = threading.RLock()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        for sub in ("models", "downloads"):
            (self.root / sub).mkdir(exist_ok=True)
        self._clean_temp_dirs()

    # --- paths -----------------------------------------------------------------------
    @property
    def credentials_path(self) -> Path:
        return self.root / "credentials.json"

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    @property
    def current_path(self) -> Path:
        return self.root / "current.json"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def downloads_dir(self) -> Path:
        return self.root / "downloads"

    @property
    def outbox_path(self) -> Path:
        return self.root / "outbox.sqlite3"

    def part_path(self, sha256: str) -> Path:
        """The partial download of the artifact with digest ``sha256``."""
        return self.downloads_dir / f"{sha256}.part"

    def model_dir(self, version_id: int) -> Path:
        return self.models_dir / str(int(version_id))

    def _clean_temp_dirs(self) -> None:
        # A crash mid-install leaves a temp dir that never got renamed into place; it is
        # garbage by construction (the rename is the commit point).
        for entry in self.models_dir.iterdir():
            if entry.name.startswith(".tmp-"):
                shutil.rmtree(entry, ignore_errors=True)

    # --- credentials -----------------------------------------------------------------
    def credentials(self) -> Credentials | None:
        """The stored credentials, or None before enrollment."""
        data = _read_json(self.credentials_path)
        if data is None:
            return None
        return Credentials(
            device_id=str(data["device_id"]),
            secret=str(data["secret"]),
            signing_public_key=str(data["signing_public_key"]),
            server_url=str(data.get("server_url", "")),
        )

    def save_credentials(self, creds: Credentials) -> None:
        """Store credentials (0600, atomically); refuse to replace a pinned signing key."""
        with self._lock:
            existing = self.credentials()
            if existing is not None and existing.signing_public_key != creds.signing_public_key:
                raise KeyMismatchError(
                    "the server's signing key differs from the key pinned at enrollment; "
                    "refusing it (wipe the state directory to trust a new server)"
                )
            key = base64.b64decode(creds.signing_public_key, validate=True)
            if len(key) != 32:
                raise ValueError(f"signing key must be 32 bytes, got {len(key)}")
            atomic_write_json(
                self.credentials_path,
                {
                    "device_id": creds.device_id,
                    "secret": creds.secret,
                    "signing_public_key": creds.signing_public_key,
                    "server_url": creds.server_url,
                },
                mode=0o600,
            )

    # --- small mutable state ---------------------------------------------------------
    def load(self) -> dict[str, Any]:
        """The contents of ``state.json`` (empty dict when absent)."""
        with self._lock:
            return _read_json(self.state_path) or {}

    def update(self, **changes: Any) -> dict[str, Any]:
        """Merge ``changes`` into ``state.json`` atomically; a value of None removes the key."""
        with self._lock:
            data = self.load()
            for key, value in changes.items():
                if value is None:
                    data.pop(key, None)
                else:
                    data[key] = value
            atomic_write_json(self.state_path, data, mode=0o600)
            return data

    def next_seq(self) -> int:
        """The next heartbeat sequence number, persisted before it is used."""
        with self._lock:
            seq = int(self.load().get("seq", 0)) + 1
            self.update(seq=seq)
            return seq

    # --- installed models ------------------------------------------------------------
    def installed(self, version_id: int) -> InstalledModel | None:
        """The installed model of ``version_id``, or None when it is not (fully) installed."""
        directory = self.model_dir(version_id)
        model = directory / "model.onnx"
        meta = _read_json(directory / "meta.json")
        if meta is None or not model.is_file():
            return None
        return InstalledModel(version_id=int(version_id), path=model, meta=meta)

    def installed_versions(self) -> list[int]:
        """Ids of every fully installed version, ascending."""
        out = []
        for entry in self.models_dir.iterdir():
            if entry.name.isdigit() and self.installed(int(entry.name)) is not None:
                out.append(int(entry.name))
        return sorted(out)

    def install(self, *, version_id: int, source: Path, meta: dict[str, Any]) -> InstalledModel:
        """Move the verified file ``source`` into ``models/<version_id>/model.onnx`` atomically.

        The model and its metadata are written into a temp directory next to ``models/``
        entries, fsynced, then the directory is renamed into place: a crash leaves either
        no ``models/<id>`` or a complete one. ``source`` is consumed (moved).
        """
        with self._lock:
            target = self.model_dir(version_id)
            if target.exists():
                shutil.rmtree(target)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{int(version_id)}-", dir=self.models_dir))
            try:
                model = tmp / "model.onnx"
                os.replace(source, model)
                with open(model, "rb") as fh:
                    os.fsync(fh.fileno())
                atomic_write_json(tmp / "meta.json", meta, mode=0o600)
                _fsync_dir(tmp)
                os.replace(tmp, target)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            _fsync_dir(self.models_dir)
            installed = self.installed(version_id)
            assert installed is not None
            return installed

    def remove_version(self, version_id: int) -> None:
        """Delete an installed version (never the current one)."""
        with self._lock:
            if version_id == self.current_version_id():
                raise ValueError("refusing to remove the version in use")
            shutil.rmtree(self.model_dir(version_id), ignore_errors=True)

    # --- current pointer -------------------------------------------------------------
    def pointer(self) -> dict[str, Any]:
        """``current.json``: ``version_id`` in use and ``previous_version_id`` (the rollback target)."""
        return _read_json(self.current_path) or {}

    def current_version_id(self) -> int | None:
        value = self.pointer().get("version_id")
        return int(value) if value is not None else None

    def current(self) -> InstalledModel | None:
        """The model in use, or None."""
        version_id = self.current_version_id()
        return self.installed(version_id) if version_id is not None else None

    def set_current(self, version_id: int | None, *, previous_version_id: int | None) -> None:
        """Swap the current pointer atomically (one rename: readers see old or new)."""
        with self._lock:
            if version_id is not None and self.installed(version_id) is None:
                raise ValueError(f"version {version_id} is not installed")
            atomic_write_json(
                self.current_path,
                {"version_id": version_id, "previous_version_id": previous_version_id},
                mode=0o600,
            )

    def last_good_version_id(self) -> int | None:
        """The last version that passed its health check here."""
        value = self.load().get("last_good_version_id")
        return int(value) if value is not None else None
