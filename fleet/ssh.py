"""SSH transport for provisioning: paramiko behind a small class with typed errors.

Host keys are never trusted on first use: an unknown key stops the connection and is
reported (`UnknownHostKeyError`) so an admin can compare its fingerprint out of band; a
key that differs from the accepted one is refused for good (`HostKeyChangedError`).
Nothing here touches the database: the caller passes the accepted keys in.
"""

from __future__ import annotations

import base64
import hashlib
import io
import shutil
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

# Sizes of reads from a channel; commands print little, this only bounds the loop.
_READ_CHUNK = 32768
# Bound on what a command may print before we stop collecting (a runaway `pip` log).
_MAX_OUTPUT = 4 * 1024 * 1024


class SshError(Exception):
    """A failed SSH operation. `permanent` errors must not be retried."""

    def __init__(self, message: str, *, permanent: bool, code: str = "ssh_error") -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.code = code


@dataclass(frozen=True)
class HostKey:
    """A server's public host key as known_hosts stores it."""

    key_type: str
    key_b64: str

    @property
    def fingerprint(self) -> str:
        return fingerprint_sha256(base64.b64decode(self.key_b64))


class UnknownHostKeyError(SshError):
    """The server offered a key nobody accepted yet; nothing was sent to it."""

    def __init__(self, key: HostKey) -> None:
        super().__init__(
            f"Unknown host key {key.key_type} {key.fingerprint}: verify it on the board "
            "(ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) and accept it.",
            permanent=False,
            code="unknown_host_key",
        )
        self.key = key


class HostKeyChangedError(SshError):
    """The server's key differs from the accepted one: possibly a man in the middle."""

    def __init__(self, *, offered: HostKey, expected: str) -> None:
        super().__init__(
            f"HOST KEY CHANGED: the server offered {offered.key_type} {offered.fingerprint} but the "
            f"accepted key is {expected}. Possible man-in-the-middle attack; not connecting. If the "
            "board was reinstalled, forget its known host and accept the new key after verifying it.",
            permanent=True,
            code="host_key_changed",
        )
        self.offered = offered


def fingerprint_sha256(key_blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob (`SHA256:` + unpadded base64)."""
    digest = hashlib.sha256(key_blob).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _host_key(key: paramiko.PKey) -> HostKey:
    return HostKey(key_type=key.get_name(), key_b64=key.get_base64())


class _RecordAndRefuse(paramiko.MissingHostKeyPolicy):
    """Records the unknown key and refuses it (never AutoAddPolicy: that trusts anyone)."""

    def missing_host_key(self, client: Any, hostname: str, key: paramiko.PKey) -> None:
        raise UnknownHostKeyError(_host_key(key))


def load_private_key(text: str, *, passphrase: str | None = None) -> paramiko.PKey:
    """Parse an OpenSSH or PEM private key (Ed25519, ECDSA or RSA)."""
    key_classes: list[Any] = [paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey]
    for key_class in key_classes:
        try:
            key: paramiko.PKey = key_class.from_private_key(io.StringIO(text), password=passphrase)
            return key
        except paramiko.PasswordRequiredException as exc:
            raise SshError("The private key is encrypted; give its passphrase.", permanent=True) from exc
        except (paramiko.SSHException, ValueError, IndexError):
            continue
    raise SshError(
        "The private key could not be read (Ed25519, ECDSA or RSA in OpenSSH or PEM format).",
        permanent=True,
        code="invalid_private_key",
    )


class SshTransport:
    """One SSH connection to a board: run commands, upload files. Use as a context manager."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        username: str,
        known_keys: list[HostKey],
        private_key: str | None = None,
        password: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.known_keys = known_keys
        self._private_key = private_key
        self._password = password
        self.timeout = timeout
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None

    def __enter__(self) -> SshTransport:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def connect(self) -> None:
        """Open the connection, checking the host key against `known_keys` before authenticating."""
        pkey = load_private_key(self._private_key) if self._private_key else None
        client = paramiko.SSHClient()
        # Only the keys given to us: never ~/.ssh/known_hosts of whoever runs the worker.
        host_name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        for known in self.known_keys:
            client.get_host_keys().add(host_name, known.key_type, _public_key(known))
        client.set_missing_host_key_policy(_RecordAndRefuse())
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.username,
                pkey=pkey,
                password=self._password,
                timeout=self.timeout,
                banner_timeout=self.timeout,
                auth_timeout=self.timeout,
                channel_timeout=self.timeout,
                look_for_keys=False,
                allow_agent=False,
            )
        except SshError:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            expected = ", ".join(k.fingerprint for k in self.known_keys) or "unknown"
            raise HostKeyChangedError(offered=_host_key(exc.key), expected=expected) from exc
        except paramiko.AuthenticationException as exc:
            client.close()
            raise SshError(
                f"Authentication failed for {self.username}@{self.host}:{self.port}: {exc}",
                permanent=True,
                code="auth_failed",
            ) from exc
        except TimeoutError as exc:
            client.close()
            raise SshError(
                f"Timed out connecting to {self.host}:{self.port} after {self.timeout:g} s.",
                permanent=False,
                code="timeout",
            ) from exc
        except (OSError, paramiko.SSHException, EOFError) as exc:
            client.close()
            raise SshError(
                f"Cannot reach {self.host}:{self.port}: {exc or type(exc).__name__}",
                permanent=False,
                code="unreachable",
            ) from exc
        self._client = client

    @property
    def server_key(self) -> HostKey:
        """The host key the server proved it holds on this connection."""
        transport = self._require().get_transport()
        assert transport is not None
        return _host_key(transport.get_remote_server_key())

    def run(
        self,
        command: str,
        *,
        timeout: float = 60.0,
        on_line: Callable[[str], None] | None = None,
        on_idle: Callable[[], None] | None = None,
    ) -> tuple[int, str, str]:
        """Run a shell command; returns (exit code, stdout, stderr). Raises SshError on timeout.

        ``on_line`` is called with each line of stdout as it arrives (long commands such as
        pip show their progress through it), ``on_idle`` whenever no output is waiting (a
        caller that batches lines flushes them there, so a line is not held back by silence).
        """
        transport = self._require().get_transport()
        if transport is None or not transport.is_active():
            raise SshError("The SSH connection was lost.", permanent=False, code="connection_lost")
        try:
            channel = transport.open_session(timeout=self.timeout)
            channel.settimeout(1.0)
            channel.exec_command(command)
            out, err, partial = bytearray(), bytearray(), bytearray()
            deadline = time.monotonic() + timeout
            # Read both streams as they come: a command that fills one pipe while we
            # wait on the other would otherwise block forever.
            while True:
                progressed = False
                if channel.recv_ready():
                    chunk = channel.recv(_READ_CHUNK)
                    out += chunk[: max(0, _MAX_OUTPUT - len(out))]
                    if on_line is not None:
                        partial += chunk
                        *lines, rest = partial.split(b"\n")
                        partial = bytearray(rest)
                        for line in lines:
                            on_line(line.decode(errors="replace").rstrip("\r"))
                    progressed = True
                if channel.recv_stderr_ready():
                    err += channel.recv_stderr(_READ_CHUNK)[: max(0, _MAX_OUTPUT - len(err))]
                    progressed = True
                if (
                    channel.exit_status_ready()
                    and not channel.recv_ready()
                    and not channel.recv_stderr_ready()
                ):
                    break
                if time.monotonic() > deadline:
                    channel.close()
                    raise SshError(
                        f"Command timed out after {timeout:g} s: {command[:80]}",
                        permanent=False,
                        code="command_timeout",
                    )
                if not progressed:
                    if on_idle is not None:
                        on_idle()
                    time.sleep(0.02)
            code = channel.recv_exit_status()
            channel.close()
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(f"SSH command failed: {exc}", permanent=False, code="connection_lost") from exc
        if on_line is not None and partial:
            on_line(partial.decode(errors="replace").rstrip("\r"))
        return code, out.decode(errors="replace"), err.decode(errors="replace")

    def upload(self, *, data: bytes, remote_path: str, mode: int = 0o644) -> None:
        """Write `data` to `remote_path` over SFTP; the mode is set before any byte is written."""
        try:
            sftp = self._sftp_client()
            with sftp.open(remote_path, "wb") as handle:
                # chmod first, so a secret never sits in a world-readable file even briefly.
                handle.chmod(mode)
                handle.set_pipelined(True)
                handle.write(data)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(
                f"Upload to {remote_path} failed: {exc}", permanent=False, code="upload_failed"
            ) from exc

    def upload_file(self, *, local_path: Path, remote_path: str, mode: int = 0o644) -> None:
        """Copy a local file to `remote_path` in chunks (wheels run to hundreds of MB).

        It is written under a temporary name and renamed, so an interrupted upload never
        leaves a truncated file under the real name.
        """
        partial = f"{remote_path}.part"
        try:
            sftp = self._sftp_client()
            with local_path.open("rb") as source, sftp.open(partial, "wb") as handle:
                handle.chmod(mode)
                handle.set_pipelined(True)
                shutil.copyfileobj(source, handle, 1024 * 1024)
            sftp.posix_rename(partial, remote_path)
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(
                f"Upload of {local_path.name} to {remote_path} failed: {exc}",
                permanent=False,
                code="upload_failed",
            ) from exc

    def file_sizes(self, remote_dir: str) -> dict[str, int]:
        """Names and sizes of the regular files in `remote_dir` (empty when it does not exist)."""
        try:
            entries = self._sftp_client().listdir_attr(remote_dir)
        except FileNotFoundError:
            return {}
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise SshError(
                f"Listing {remote_dir} failed: {exc}", permanent=False, code="connection_lost"
            ) from exc
        return {
            entry.filename: int(entry.st_size or 0)
            for entry in entries
            if entry.st_mode is not None and stat.S_ISREG(entry.st_mode)
        }

    def close(self) -> None:
        """Close the SFTP session and the connection (safe to call twice)."""
        if self._sftp is not None:
            self._sftp.close()
            self._sftp = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def _sftp_client(self) -> paramiko.SFTPClient:
        if self._sftp is None:
            self._sftp = self._require().open_sftp()
        return self._sftp

    def _require(self) -> paramiko.SSHClient:
        if self._client is None:
            raise SshError("Not connected.", permanent=False, code="not_connected")
        return self._client


def _public_key(known: HostKey) -> paramiko.PKey:
    key: paramiko.PKey = paramiko.PKey.from_type_string(known.key_type, base64.b64decode(known.key_b64))
    return key
