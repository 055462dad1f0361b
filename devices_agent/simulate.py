"""A simulated fleet: real agents, each fed by a generated application, against a real server.

Every simulated board is a full :class:`devices_agent.agent.Agent` — the same one
``flotilla-agent run`` runs — with its own state directory under ``state_root``. What is
simulated is only the application beside it: a :class:`GeneratedApp` that holds the
board's share of a data set, gives the agent labelled examples through the local API
(``add_samples``) once a model is installed, and then asks for predictions and tells the
right answers (``feedback``), as an application that learns the truth later would. The
agent trains, personalises and reports drift from what the application sent; nothing
else reaches it.

Data (seeded, so a restarted simulator resumes the same boards with the same data):

- ``digits``: a non-IID Dirichlet share (``alpha``) of scikit-learn's digits per board;
- ``activity``: 3-axis accelerometer windows of one simulated person per board, each
  with their own style and mix of six activities (:func:`devices_agent.data.activity_windows`).

Two ways to run the agents, the same code in both:

- in this process (default): agents are scheduled on a small pool of threads by their
  next due time and the applications call each agent's local API service directly;
  boards running the same model file share one ONNX Runtime session; 1,000 boards fit;
- as processes (``processes=True``): every board is a ``flotilla-agent run`` process with
  its own config file, and its application talks to it over the local API's Unix socket.

Hardware profiles: a fraction ``slow_fraction`` of the boards (chosen by ``seed``) are
"slow boards" that add ``slow_delay_ms`` to every inference and every health-check run;
their tags say ``profile-slow`` (the others ``profile-fast``).
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy.typing as npt

from devices_agent.agent import Agent, EnrollmentError, RestartRequested, TaskHandler
from devices_agent.client import AuthError, ServerError, WireCounter, make_http_client
from devices_agent.config import AgentConfig
from devices_agent.inference import load_session
from devices_agent.local_api import LocalApiError
from devices_agent.local_client import AgentClient
from devices_agent.local_client import LocalApiError as ClientApiError
from devices_agent.state import InstalledModel

__all__ = ["DATASETS", "Fleet", "FleetStats", "GeneratedApp", "SessionCache", "SimDevice", "board_data"]

log = logging.getLogger("devices_agent.simulate")

MIN_EXAMPLES = 5  # per partition, as devices_agent.data.dirichlet_partition requires
DATASETS = ("digits", "activity")
# The share of a board's data its application hands over as labelled history; the rest
# arrives as live predictions, labelled later through feedback.
HISTORY_SHARE = 0.6
ACTIVITY_WINDOWS_PER_BOARD = 240


def board_data(*, dataset: str, index: int, boards: int, seed: int, alpha: float) -> tuple[Any, Any]:
    """Board ``index``'s examples ``(x, y)`` of ``dataset`` (deterministic for the seed)."""
    from devices_agent.data import activity_windows, client_dataset, load_digits_split

    if dataset == "digits":
        # The digits training split has ~1,400 examples: beyond one partition per five
        # examples, boards share partitions (board i uses partition i mod parts).
        parts = max(1, min(boards, len(load_digits_split(seed=seed)[1]) // MIN_EXAMPLES))
        return client_dataset(client_index=index % parts, n_clients=parts, alpha=alpha, seed=seed)
    if dataset == "activity":
        return activity_windows(user=index, n=ACTIVITY_WINDOWS_PER_BOARD, seed=seed)
    raise ValueError(f"unknown data set {dataset!r}; known: {DATASETS}")


class LocalApi(Protocol):
    """What an application calls: the agent's service in-process, or a socket client."""

    def predict(self, inputs: Any, *, batch: bool = False) -> Any: ...

    def feedback(self, prediction_id: int, label: Any) -> Any: ...

    def add_samples(self, x: Any, y: Any) -> Any: ...


class _InProcess:
    """The agent's :class:`devices_agent.local_api.LocalService`, called as a client would."""

    def __init__(self, agent: Agent) -> None:
        self.service = agent.local

    def predict(self, inputs: Any, *, batch: bool = False) -> Any:
        answer = self.service.predict(inputs, batch=batch)
        return answer["predictions"] if batch else answer["predictions"][0]

    def feedback(self, prediction_id: int, label: Any) -> Any:
        return self.service.feedback(prediction_id, label)

    def add_samples(self, x: Any, y: Any) -> Any:
        return self.service.add_samples(x, y)


@dataclass
class GeneratedApp:
    """The application of one simulated board: labelled history, then predictions with feedback."""

    x: npt.NDArray[Any]
    y: npt.NDArray[Any]
    rng: random.Random
    cursor: int = 0
    history_sent: bool = False
    predictions: int = 0

    def step(self, api: LocalApi, *, predictions: int) -> int:
        """One cycle: hand over the history once, then ``predictions`` live predictions.

        Returns the predictions made; 0 while the board has no model (its local API
        refuses until it knows the input contract).
        """
        split = int(len(self.y) * HISTORY_SHARE)
        try:
            if not self.history_sent:
                if split:
                    api.add_samples(self.x[:split], self.y[:split])
                self.history_sent = True
                self.cursor = split
            live = len(self.y) - split
            made = 0
            for _ in range(predictions if live > 0 else 0):
                i = split + (self.cursor - split) % live
                self.cursor += 1
                p = api.predict(self.x[i])
                api.feedback(int(p["prediction_id"]), self.y[i].tolist())
                made += 1
        except (LocalApiError, ClientApiError) as exc:
            if exc.code == "no_model":
                return 0
            raise
        self.predictions += made
        return made


class SessionCache:
    """ONNX Runtime sessions shared by digest: a thousand boards on one model load it once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Any] = {}

    def get(self, model: InstalledModel) -> Any:
        """The session for ``model``'s file (by SHA-256), loading it once."""
        key = model.sha256 or str(model.path)
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = load_session(model.path)
                self._sessions[key] = session
            return session


@dataclass
class SimDevice:
    """One simulated board: its agent (or process), its application and its schedule."""

    index: int
    agent: Agent | None
    app: GeneratedApp
    profile: str
    rng: random.Random
    config: AgentConfig
    process: subprocess.Popen[bytes] | None = None
    client: AgentClient | None = None
    steps: int = 0
    failures: int = 0
    last_error: str = ""
    dead: bool = False


@dataclass
class FleetStats:
    """Counters of a running fleet (read them any time)."""

    heartbeats: int = 0
    heartbeat_failures: int = 0
    predictions: int = 0
    enrolled: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        return {
            "heartbeats": self.heartbeats,
            "heartbeat_failures": self.heartbeat_failures,
            "predictions": self.predictions,
            "enrolled": self.enrolled,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
        }


class Fleet:
    """N simulated boards (see the module docstring); :meth:`start`, then :meth:`stop`."""

    def __init__(
        self,
        *,
        server_url: str,
        token: str,
        devices: int,
        state_root: Path | str,
        dataset: str = "digits",
        seed: int = 0,
        alpha: float = 0.5,
        heartbeat_interval_s: float | None = None,
        stagger_s: float | None = None,
        inferences_per_cycle: int = 8,
        slow_fraction: float = 0.2,
        slow_delay_ms: float = 15.0,
        threads: int = 8,
        task_handlers: dict[str, TaskHandler] | None = None,
        train: bool = True,
        websocket: bool = False,
        name_prefix: str = "sim",
        count_bytes: bool = False,
        processes: bool = False,
        app_interval_s: float | None = None,
    ) -> None:
        if devices < 1:
            raise ValueError("devices must be at least 1")
        if dataset not in DATASETS:
            raise ValueError(f"unknown data set {dataset!r}; known: {DATASETS}")
        self.server_url = server_url
        self.stats = FleetStats()
        self.counter = WireCounter() if count_bytes else None
        self.processes = processes
        self.app_interval_s = app_interval_s or heartbeat_interval_s or 10.0
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._threads: list[threading.Thread] = []
        self.threads = max(1, threads)
        self.inferences_per_cycle = inferences_per_cycle
        self.sessions = SessionCache()
        # One connection pool for the whole fleet: real boards each hold one connection,
        # but a thousand pools in one process would only measure file-descriptor limits.
        self.http = make_http_client(
            timeout_s=30.0,
            limits=httpx.Limits(max_connections=self.threads * 2, max_keepalive_connections=self.threads * 2),
        )
        root = Path(state_root)
        picker = random.Random(seed)
        self.devices: list[SimDevice] = []
        for index in range(devices):
            x, y = board_data(dataset=dataset, index=index, boards=devices, seed=seed, alpha=alpha)
            slow = picker.random() < slow_fraction
            profile = "slow" if slow else "fast"
            config = AgentConfig(
                server_url=server_url,
                state_dir=root / f"device-{index:04d}",
                enrollment_token=token,
                name=f"{name_prefix}-{index:04d}",
                tags=["simulated", f"profile-{profile}"],
                hardware={"extra": {"profile": profile, "simulated": True}},
                heartbeat_interval_s=heartbeat_interval_s,
                inference_delay_ms=slow_delay_ms if slow else 0.0,
                health_check_runs=5,
                websocket=websocket if processes else False,
                backoff_cap_s=max(heartbeat_interval_s or 60.0, 5.0),
                train=train,
                personalise_epochs=3,
                device_seed=seed * 1_000_003 + index,
                # A simulated fleet runs against a lab server, often plain HTTP on loopback.
                allow_insecure_http=server_url.startswith("http://"),
            )
            rng = random.Random(seed * 1_000_003 + index)
            app = GeneratedApp(x=x, y=y, rng=rng)
            agent = None
            if not processes:
                agent = Agent(
                    config=config,
                    http=self.http,
                    rng=rng,
                    task_handlers=dict(task_handlers) if task_handlers is not None else {},
                    session_provider=self.sessions.get,
                    counter=self.counter,
                    serve_local_api=False,
                )
                if not train:
                    agent.task_handlers.pop("train", None)
            self.devices.append(
                SimDevice(index=index, agent=agent, app=app, profile=profile, rng=rng, config=config)
            )
        first = stagger_s if stagger_s is not None else (heartbeat_interval_s or 10.0)
        now = time.monotonic()
        for device in self.devices:
            heapq.heappush(self._heap, (now + device.rng.uniform(0.0, max(first, 0.0)), device.index))

    # --- running ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the agents' processes (with ``processes``) and the scheduler threads."""
        if self.processes:
            for device in self.devices:
                self._spawn(device)
        for n in range(self.threads):
            thread = threading.Thread(target=self._work, name=f"fleet-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _spawn(self, device: SimDevice) -> None:
        """Start ``flotilla-agent run`` for one board, with a config file of its own."""
        config = device.config
        config.state_dir.mkdir(parents=True, exist_ok=True)
        path = config.state_dir / "agent.json"
        values = {
            "server_url": config.server_url,
            "state_dir": str(config.state_dir),
            "enrollment_token": config.enrollment_token,
            "name": config.name,
            "tags": config.tags,
            "hardware": config.hardware,
            "heartbeat_interval_s": config.heartbeat_interval_s,
            "inference_delay_ms": config.inference_delay_ms,
            "health_check_runs": config.health_check_runs,
            "websocket": config.websocket,
            "train": config.train,
            "personalise_epochs": config.personalise_epochs,
            "device_seed": config.device_seed,
            "backoff_cap_s": config.backoff_cap_s,
            "allow_insecure_http": config.allow_insecure_http,
        }
        path.write_text(json.dumps({k: v for k, v in values.items() if v is not None}))
        log_file = open(config.state_dir / "process.log", "ab")  # noqa: SIM115 - the child owns it
        device.process = subprocess.Popen(
            [sys.executable, "-m", "devices_agent", "run", "--config", str(path)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log_file.close()
        socket_path = config.local_api_socket_path
        assert socket_path is not None
        device.client = AgentClient(str(socket_path))

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop scheduling, wait for running cycles, close every agent (and stop its process)."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=timeout)
        for device in self.devices:
            if device.agent is not None:
                device.agent.close()
            if device.client is not None:
                device.client.close()
            if device.process is not None and device.process.poll() is None:
                device.process.terminate()
        for device in self.devices:
            if device.process is not None:
                try:
                    device.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    device.process.kill()
        self.http.close()

    def nudge_all(self) -> None:
        """Make every board heartbeat as soon as a worker is free (the simulator's nudge)."""
        with self._lock:
            now = time.monotonic()
            self._heap = [(now + i * 1e-6, index) for i, (_, index) in enumerate(sorted(self._heap))]
            self._lock.notify_all()

    def _work(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if not self._heap:
                    self._lock.wait(timeout=0.5)
                    continue
                due, index = self._heap[0]
                wait = due - time.monotonic()
                if wait > 0:
                    self._lock.wait(timeout=min(wait, 0.5))
                    continue
                heapq.heappop(self._heap)
            device = self.devices[index]
            delay = self.cycle(device)
            if delay is None:
                continue
            with self._lock:
                heapq.heappush(self._heap, (time.monotonic() + delay, index))
                self._lock.notify()

    def cycle(self, device: SimDevice) -> float | None:
        """One cycle of a board; returns the delay to the next, None when it stopped for good."""
        if device.agent is None:
            return self._cycle_process(device)
        agent = device.agent
        try:
            enrolled = agent.device_id is not None
            try:
                result = agent.step()
            except RestartRequested:
                agent.restart_requested = False
                agent.runtime.invalidate()
                return 0.1
            if not enrolled and agent.device_id is not None:
                with self._lock:
                    self.stats.enrolled += 1
        except (AuthError, EnrollmentError) as exc:
            device.dead = True
            device.last_error = str(exc)
            log.warning("device %s stops: %s", device.index, exc)
            return None
        except ServerError as exc:
            device.failures += 1
            device.last_error = str(exc)
            with self._lock:
                self.stats.heartbeat_failures += 1
            return agent.backoff.delay()
        except Exception as exc:  # a simulated board must not take the fleet down
            device.failures += 1
            device.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("device %s cycle failed", device.index)
            return agent.backoff.delay() + 1.0
        device.steps += 1
        with self._lock:
            if result.ok:
                self.stats.heartbeats += 1
            else:
                self.stats.heartbeat_failures += 1
        if result.ok:
            self.infer(device)
        # +-10 % jitter keeps boards that were nudged together from staying together.
        return result.interval_s * device.rng.uniform(0.9, 1.1) if result.ok else result.interval_s

    def _cycle_process(self, device: SimDevice) -> float | None:
        process = device.process
        if process is not None and process.poll() is not None:
            device.dead = True
            device.last_error = f"flotilla-agent exited with code {process.returncode}"
            log.warning("device %s: %s", device.index, device.last_error)
            return None
        try:
            self.infer(device)
        except (OSError, ClientApiError) as exc:
            # The agent is still starting (no socket yet) or restarting.
            device.last_error = str(exc)
        device.steps += 1
        return self.app_interval_s * device.rng.uniform(0.9, 1.1)

    def infer(self, device: SimDevice) -> int:
        """The board's application: history once, then a few predictions with feedback."""
        if self.inferences_per_cycle <= 0:
            return 0
        api: LocalApi
        if device.agent is not None:
            api = _InProcess(device.agent)
        else:
            assert device.client is not None
            api = device.client
        made = device.app.step(api, predictions=self.inferences_per_cycle)
        with self._lock:
            self.stats.predictions += made
        return made

    def run_for(self, seconds: float, *, on_tick: Callable[[Fleet], None] | None = None) -> None:
        """Run (starting if needed) for ``seconds``, calling ``on_tick`` every few seconds."""
        if not self._threads:
            self.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            if on_tick is not None:
                on_tick(self)
