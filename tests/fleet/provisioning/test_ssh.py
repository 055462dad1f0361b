"""The SSH transport alone, against the real sshd: commands, uploads, host keys, errors."""

from __future__ import annotations

import stat

import pytest

from fleet.ssh import HostKey, HostKeyChangedError, SshError, SshTransport, UnknownHostKeyError
from tests.fleet.provisioning.conftest import Board


def _transport(board: Board, **overrides: object) -> SshTransport:
    fields: dict[str, object] = {
        "host": board.host,
        "port": board.port,
        "username": board.username,
        "known_keys": [HostKey(key_type=board.host_key_type, key_b64=board.host_key_b64)],
        "private_key": board.private_key,
        "timeout": 5.0,
    }
    fields.update(overrides)
    return SshTransport(**fields)  # type: ignore[arg-type]


def test_run_returns_exit_code_and_both_streams(board: Board) -> None:
    with _transport(board) as ssh:
        assert ssh.run("echo out; echo err >&2; exit 3") == (3, "out\n", "err\n")
        # More than a pipe buffer on both streams at once must not deadlock.
        code, out, err = ssh.run("head -c 300000 /dev/zero | tr '\\0' a; head -c 300000 /dev/zero >&2")
        assert code == 0 and len(out) == 300000 and len(err) == 300000
        assert ssh.server_key.fingerprint == board.host_key_fingerprint


def test_a_command_that_overruns_its_timeout_is_a_retryable_error(board: Board) -> None:
    with _transport(board) as ssh, pytest.raises(SshError) as caught:
        ssh.run("sleep 5", timeout=0.5)
    assert caught.value.code == "command_timeout" and not caught.value.permanent


def test_upload_sets_the_mode_before_writing(board: Board) -> None:
    target = board.root / "uploaded-secret"
    with _transport(board) as ssh:
        ssh.upload(data=b"token = 1\n", remote_path=str(target), mode=0o600)
    assert target.read_bytes() == b"token = 1\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_host_keys_are_never_trusted_on_first_use(board: Board) -> None:
    with pytest.raises(UnknownHostKeyError) as unknown:
        _transport(board, known_keys=[]).connect()
    assert unknown.value.key.fingerprint == board.host_key_fingerprint
    assert unknown.value.key.key_b64 == board.host_key_b64

    changed = [HostKey(key_type=board.host_key_type, key_b64=board.other_host_key_b64)]
    with pytest.raises(HostKeyChangedError) as caught:
        _transport(board, known_keys=changed).connect()
    assert caught.value.permanent and caught.value.code == "host_key_changed"
    assert board.host_key_fingerprint in caught.value.message


def test_bad_credentials_and_keys_are_permanent_errors(board: Board) -> None:
    with pytest.raises(SshError) as wrong_key:
        _transport(board, private_key=board.other_private_key).connect()
    assert wrong_key.value.permanent and wrong_key.value.code == "auth_failed"

    with pytest.raises(SshError) as garbage:
        _transport(board, private_key="-----BEGIN OPENSSH PRIVATE KEY-----\nnope\n").connect()
    assert garbage.value.permanent and garbage.value.code == "invalid_private_key"


def test_run_hands_over_stdout_lines_as_they_come(board: Board) -> None:
    import time

    seen: list[tuple[str, float]] = []
    idle: list[float] = []
    with _transport(board) as ssh:
        code, out, err = ssh.run(
            "printf 'one\\ntwo\\n'; sleep 1; printf 'three\\r\\nfour'; echo oops >&2",
            on_line=lambda line: seen.append((line, time.monotonic())),
            on_idle=lambda: idle.append(time.monotonic()),
        )
    assert (code, out, err) == (0, "one\ntwo\nthree\r\nfour", "oops\n")
    assert [line for line, _ in seen] == ["one", "two", "three", "four"]
    assert seen[2][1] - seen[1][1] > 0.5, "the first lines came before the command ended"
    assert [t for t in idle if seen[1][1] < t < seen[2][1]], "the silence in between was reported"


def test_files_are_uploaded_whole_and_listed_with_their_sizes(board: Board, tmp_path: object) -> None:
    import os
    from pathlib import Path

    local = Path(str(tmp_path)) / "big.whl"
    local.write_bytes(os.urandom(3 * 1024 * 1024 + 5))
    remote = board.root / "uploads"
    with _transport(board) as ssh:
        assert ssh.file_sizes(str(remote)) == {}
        remote.mkdir()
        (remote / "sub").mkdir()
        ssh.upload_file(local_path=local, remote_path=f"{remote}/big.whl")
        assert ssh.file_sizes(str(remote)) == {"big.whl": local.stat().st_size}
    assert (remote / "big.whl").read_bytes() == local.read_bytes()
    assert stat.S_IMODE((remote / "big.whl").stat().st_mode) == 0o644
