"""Starting and stopping the server's processes: web server, Celery worker and beat.

The commands are those of `docker-compose.yml`; `config.stack.Stack` starts them with
one shared environment for the demo, the test suite's live stack, the benchmarks and
the screenshots.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def web_command(*, port: int, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    """The ASGI server as production runs it (uvicorn with uvloop and httptools)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "config.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--no-access-log",
        "--lifespan",
        "off",
        "--timeout-graceful-shutdown",
        "5",
        # Devices read neither header, and both would ride on every heartbeat answer.
        "--no-server-header",
        "--no-date-header",
    ]


def wsgi_command(*, port: int, host: str = "127.0.0.1", workers: int = 2, threads: int = 4) -> list[str]:
    """The WSGI alternative: gunicorn with threaded workers, keep-alive connections."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "config.wsgi:application",
        "--bind",
        f"{host}:{port}",
        "--workers",
        str(workers),
        "--worker-class",
        "gthread",
        "--threads",
        str(threads),
        "--keep-alive",
        "30",
        "--log-level",
        "warning",
    ]


# Every queue the settings route tasks to (TASK_QUEUES): one local worker serves them all.
ALL_QUEUES = "control,ml,io"


def worker_command(*, concurrency: int = 2, queues: str = ALL_QUEUES, name: str = "worker") -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "config",
        "worker",
        "--loglevel",
        "INFO",
        "--concurrency",
        str(concurrency),
        "--queues",
        queues,
        "--hostname",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
    ]


def beat_command(*, schedule_file: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "config",
        "beat",
        "--loglevel",
        "INFO",
        "--schedule",
        str(schedule_file),
    ]


@dataclass
class Managed:
    """One child process, started in its own process group so it can be stopped whole."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, *, timeout: float = 10.0) -> None:
        """Ask politely (SIGTERM to the group), then insist (SIGKILL)."""
        if not self.running:
            return
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        """Die at once, as a crash would: no cleanup, no acknowledgement of running tasks."""
        if self.running:
            assert self.process is not None
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)


@dataclass
class ProcessGroup:
    """Named child processes that share one environment."""

    env: dict[str, str]
    log_dir: Path | None = None
    children: dict[str, Managed] = field(default_factory=dict)

    def start(self, name: str, command: list[str], *, extra_env: Mapping[str, str] | None = None) -> Managed:
        env = {**self.env, **(extra_env or {})}
        log_path = self.log_dir / f"{name}.log" if self.log_dir else None
        child = Managed(name=name, command=command, env=env, log_path=log_path)
        child.start()
        self.children[name] = child
        return child

    def stop(self, name: str, *, timeout: float = 10.0) -> None:
        child = self.children.pop(name, None)
        if child:
            child.stop(timeout=timeout)

    def stop_all(self, *, timeout: float = 15.0) -> None:
        """SIGTERM every child at once, then wait; whoever is still up at the deadline is killed."""
        children = list(self.children.values())
        self.children.clear()
        for child in children:
            if child.running:
                assert child.process is not None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()


def wait_http_ok(url: str, *, timeout: float = 60.0, process: Managed | None = None) -> None:
    """Wait until `url` answers 200, failing early if the process serving it died."""
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        if process is not None and not process.running:
            raise RuntimeError(f"{process.name} exited before {url} answered (see {process.log_path})")
        try:
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last_error = str(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout}s: {last_error}")
