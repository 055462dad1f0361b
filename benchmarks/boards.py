"""Boards as real processes: ``python -m devices_agent run`` each with its own config file,
state directory and local API socket, and what a benchmark reads of them (status over the
socket, RSS, CPU, the kernel's high-water mark). ``benchmarks.board_learning`` and
``benchmarks.closed_loop`` run their fleets with it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOLDOUT_PERCENT = 20
HEARTBEAT_S = 3.0


def wait_for(check: Callable[[], bool], *, timeout: float, what: str, logs: Callable[[], str] = str) -> float:
    """Seconds until ``check()`` held; raises with the boards' log tails after ``timeout``."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"timed out waiting for {what}\n{logs()[-4000:]}")
        time.sleep(0.25)
    return time.monotonic() - started


def rss_mb(pid: int) -> float:
    import psutil

    return float(psutil.Process(pid).memory_info().rss / 1e6)


def peak_rss_mb(pid: int) -> float:
    """The kernel's high-water mark of the process's RSS (``VmHWM``), over its whole life."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def cpu_s(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes used so far."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def torch_mapped(pid: int) -> bool:
    """Whether libtorch is mapped into process ``pid`` (it is once torch was imported)."""
    import psutil

    return any("libtorch" in os.path.basename(m.path) for m in psutil.Process(pid).memory_maps())


@dataclass
class Board:
    """One ``flotilla-agent run`` process and where it keeps its state."""

    index: int
    name: str
    state_dir: Path
    socket: Path
    log: Path
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return int(self.process.pid)


def spawn(
    root: Path,
    index: int,
    *,
    url: str,
    token: str,
    heartbeat_s: float = HEARTBEAT_S,
    extra: dict[str, Any] | None = None,
) -> Board:
    """Start board ``index``; ``extra`` adds to or overrides its config (devices_agent.config)."""
    state = root / f"board-{index:02d}"
    state.mkdir(parents=True)
    socket = state / "agent.sock"
    config = {
        "server_url": url,
        "allow_insecure_http": url.startswith("http://"),
        "state_dir": str(state),
        "enrollment_token": token,
        "name": f"wrist-{index:02d}",
        # No tags of its own: the enrollment token's tags decide its groups.
        "heartbeat_interval_s": heartbeat_s,
        "health_check_runs": 3,
        # The device state (example counts) rides on every other heartbeat.
        "state_every": 2,
        "personalise": False,
        "device_seed": index,
        "holdout_percent": HOLDOUT_PERCENT,
        "local_api_socket": str(socket),
        **(extra or {}),
    }
    path = root / f"board-{index:02d}.json"
    path.write_text(json.dumps(config))
    log = root / f"board-{index:02d}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "devices_agent", "run", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return Board(
        index=index, name=f"wrist-{index:02d}", state_dir=state, socket=socket, log=log, process=process
    )


def logs(boards: list[Board]) -> str:
    parts = []
    for board in boards:
        text = board.log.read_text(errors="replace") if board.log.exists() else ""
        parts.append(f"--- {board.name} (exit {board.process.poll()})\n{text[-1500:]}")
    return "\n".join(parts)


def alive(boards: list[Board]) -> None:
    dead = [b for b in boards if b.process.poll() is not None]
    if dead:
        raise RuntimeError(f"{len(dead)} board process(es) exited\n{logs(dead)}")


def status(board: Board) -> dict[str, Any] | None:
    from devices_agent.local_client import AgentClient, LocalApiError

    try:
        with AgentClient(str(board.socket), timeout=5) as client:
            return client.status()
    except (OSError, LocalApiError):
        return None


class RssSampler:
    """Samples the RSS of a set of processes in a thread; keeps each one's peak."""

    def __init__(self, pids: list[int], *, every_s: float = 0.2) -> None:
        self.pids = pids
        self.every_s = every_s
        self.peak = dict.fromkeys(pids, 0.0)
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        import psutil

        processes = {pid: psutil.Process(pid) for pid in self.pids}
        while not self._stop.is_set():
            for pid, process in processes.items():
                try:
                    self.peak[pid] = max(self.peak[pid], process.memory_info().rss / 1e6)
                except psutil.NoSuchProcess:
                    continue
            self.samples += 1
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def stop(boards: list[Board]) -> None:
    """Terminate every board process still running; kill those that do not exit in 30 s."""
    for board in boards:
        if board.process.poll() is None:
            board.process.terminate()
    for board in boards:
        try:
            board.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            board.process.kill()
