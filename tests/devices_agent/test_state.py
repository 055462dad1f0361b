"""The state directory: permissions, pinned key, atomic install and pointer swap."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest

from devices_agent.state import AgentState, Credentials, KeyMismatchError, atomic_write


def _creds(key: bytes = b"\x02" * 32) -> Credentials:
    return Credentials(
        device_id="d1", secret="s", signing_public_key=base64.b64encode(key).decode(), server_url="http://x"
    )


def test_directory_and_credentials_are_private(tmp_path: Path) -> None:
    state = AgentState(tmp_path / "agent")
    state.save_credentials(_creds())
    assert stat.S_IMODE(os.stat(state.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(state.credentials_path).st_mode) == 0o600
    assert state.credentials() == _creds()
    assert not [p for p in state.root.iterdir() if p.name.endswith(".tmp")]


def test_a_different_signing_key_is_refused_after_pinning(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    state.save_credentials(_creds(b"\x02" * 32))
    with pytest.raises(KeyMismatchError):
        state.save_credentials(_creds(b"\x03" * 32))
    assert state.credentials() == _creds(b"\x02" * 32)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write(target, b"old")

    class Boom(bytes):
        pass

    with pytest.raises(TypeError):
        atomic_write(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_install_is_all_or_nothing_and_the_pointer_swaps(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    src = tmp_path / "downloads" / "a.part"
    src.write_bytes(b"model-one")
    one = state.install(version_id=1, source=src, meta={"sha256": "aa", "label": "digits:v1"})
    assert one.path.read_bytes() == b"model-one" and not src.exists()
    assert state.installed_versions() == [1]
    with pytest.raises(ValueError):
        state.set_current(2, previous_version_id=None)  # not installed: refused
    state.set_current(1, previous_version_id=None)
    src.write_bytes(b"model-two")
    state.install(version_id=2, source=src, meta={"sha256": "bb"})
    state.set_current(2, previous_version_id=1)
    assert state.current_version_id() == 2 and state.pointer()["previous_version_id"] == 1
    with pytest.raises(ValueError):
        state.remove_version(2)


def test_a_crash_mid_install_leaves_no_partial_model(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    # What a crash between writing and renaming leaves behind: a temp dir with a model
    # but no meta, never a models/<id> entry.
    leftover = state.models_dir / ".tmp-5-abc"
    leftover.mkdir()
    (leftover / "model.onnx").write_bytes(b"half")
    assert state.installed(5) is None and state.installed_versions() == []
    AgentState(tmp_path)  # the next start cleans it
    assert not leftover.exists()


def test_seq_is_persisted(tmp_path: Path) -> None:
    state = AgentState(tmp_path)
    assert [state.next_seq() for _ in range(3)] == [1, 2, 3]
    assert AgentState(tmp_path).next_seq() == 4
