"""A simulated fleet: N agents in one process, against a real server over real HTTP.

Every simulated device is a full :class:`devices_agent.agent.Agent` with its own state
directory under ``state_root`` (credentials, models, outbox) and its own non-IID share
of scikit-learn's digits (:func:`devices_agent.data.client_dataset`, Dirichlet ``alpha``,
fixed by ``seed``; fleets larger than the data set allows, about 280 devices, share
partitions round-robin), so restarting the simulator resumes the same devices with the same
data. Each cycle a device heartbeats (enrolling first), reconciles its model, then
classifies a few of its own examples with their labels as feedback, so latency,
confidence and accuracy metrics flow to the server.

Scale: devices are scheduled on a small pool of worker threads by their next due time,
not one thread each, and devices running the same model file share one ONNX Runtime
session; 1,000 devices fit in one process. Starts are staggered uniformly over the first
interval (``stagger_s``) and every later wait gets +-10 % jitter, so the fleet never
heartbeats in lockstep.

Training: unless ``train=False``, each device answers ``train`` tasks with
:class:`devices_agent.federated.FederatedTrainer` over its local data (torch is imported
on the first task only). ``task_handlers`` replaces or adds handlers.

Hardware profiles: a fraction ``slow_fraction`` of the devices (chosen by ``seed``) are
"slow boards" that add ``slow_delay_ms`` to every inference and every health-check run;
their tags say ``profile-slow`` (the others ``profile-fast``). Rollout latency gates and
per-device latency budgets see the difference.
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from devices_agent.agent import Agent, EnrollmentError, RestartRequested, TaskHandler
from devices_agent.client import AuthError, ServerError, WireCounter, make_http_client
from devices_agent.config import AgentConfig
from devices_agent.inference import load_session
from devices_agent.state import InstalledModel

__all__ = ["Fleet", "FleetStats", "SimDevice", "SessionCache"]

log = logging.getLogger("devices_agent.simulate")

MIN_EXAMPLES = 5  # per partition, as devices_agent.data.dirichlet_partition requires


class SessionCache:
    """ONNX Runtime sessions shared by digest: a thousand devices on one model load it once."""

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
    """One simulated board: its agent, its data and its schedule."""

    index: int
    agent: Agent
    x: np.ndarray[Any, Any]
    y: np.ndarray[Any, Any]
    profile: str
    rng: random.Random
    cursor: int = 0
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
    """N simulated devices on a pool of worker threads; :meth:`start`, then :meth:`stop`."""

    def __init__(
        self,
        *,
        server_url: str,
        token: str,
        devices: int,
        state_root: Path | str,
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
    ) -> None:
        if devices < 1:
            raise ValueError("devices must be at least 1")
        self.server_url = server_url
        self.stats = FleetStats()
        self.counter = WireCounter() if count_bytes else None
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._threads: list[threading.Thread] = []
        self.threads = max(1, threads)
        self.inferences_per_cycle = inferences_per_cycle
        self.websocket = websocket
        self.sessions = SessionCache()
        # One connection pool for the whole fleet: real boards each hold one connection,
        # but a thousand pools in one process would only measure file-descriptor limits.
        self.http = make_http_client(
            timeout_s=30.0,
            limits=httpx.Limits(max_connections=self.threads * 2, max_keepalive_connections=self.threads * 2),
        )
        from devices_agent.data import client_dataset, load_digits_split

        # The digits training split has ~1,400 examples: beyond one partition per five
        # examples, devices share partitions (device i uses partition i mod parts).
        parts = max(1, min(devices, len(load_digits_split(seed=seed)[1]) // MIN_EXAMPLES))
        root = Path(state_root)
        picker = random.Random(seed)
        self.devices: list[SimDevice] = []
        for index in range(devices):
            x, y = client_dataset(client_index=index % parts, n_clients=parts, alpha=alpha, seed=seed)
            slow = picker.random() < slow_fraction
            profile = "slow" if slow else "fast"
            config = AgentConfig(
                server_url=server_url,
                state_dir=root / f"device-{index:04d}",
                enrollment_token=token,
                name=f"{name_prefix}-{index:04d}",
                tags=["simulated", f"profile-{profile}"],
                hardware={"arch": "sim", "extra": {"profile": profile, "simulated": True}},
                heartbeat_interval_s=heartbeat_interval_s,
                inference_delay_ms=slow_delay_ms if slow else 0.0,
                health_check_runs=5,
                websocket=False,
                backoff_cap_s=max(heartbeat_interval_s or 60.0, 5.0),
                personalise=len(y) >= 2,
                personalise_epochs=3,
            )
            rng = random.Random(seed * 1_000_003 + index)
            agent = Agent(
                config=config,
                http=self.http,
                rng=rng,
                task_handlers=dict(task_handlers) if task_handlers is not None else {},
                session_provider=self.sessions.get,
                local_data=(x, y),
                counter=self.counter,
            )
            if train and "train" not in agent.task_handlers:
                agent.task_handlers["train"] = _trainer_handler(agent, device_seed=seed * 1_000_003 + index)
            agent.device_state = {"local_examples": len(y)}
            self.devices.append(SimDevice(index=index, agent=agent, x=x, y=y, profile=profile, rng=rng))
        first = stagger_s if stagger_s is not None else (heartbeat_interval_s or 10.0)
        now = time.monotonic()
        for device in self.devices:
            heapq.heappush(self._heap, (now + device.rng.uniform(0.0, max(first, 0.0)), device.index))

    # --- running ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker threads (and nudge listeners when ``websocket``)."""
        for n in range(self.threads):
            thread = threading.Thread(target=self._work, name=f"fleet-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop scheduling, wait for running cycles, close every agent."""
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=timeout)
        for device in self.devices:
            device.agent.close()
        self.http.close()

    def nudge_all(self) -> None:
        """Make every device heartbeat as soon as a worker is free (the simulator's nudge)."""
        with self._lock:
            now = time.monotonic()
            self._heap = [(now + i * 1e-6, index) for i, (_, index) in enumerate(sorted(self._heap))]
            heapq.heapify(self._heap)
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
        """One heartbeat cycle plus local inference; returns the delay to the next, None when dead."""
        agent = device.agent
        try:
            enrolled = agent.device_id is not None
            try:
                result = agent.step()
            except RestartRequested:
                agent.restart_requested = False
                agent.predictor = None
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
        # +-10 % jitter keeps devices that were nudged together from staying together.
        return result.interval_s * device.rng.uniform(0.9, 1.1) if result.ok else result.interval_s

    def infer(self, device: SimDevice) -> int:
        """Classify the next few local examples with their labels as feedback."""
        predictor = device.agent.load_predictor()
        if predictor is None or self.inferences_per_cycle <= 0:
            return 0
        n = len(device.y)
        for _ in range(self.inferences_per_cycle):
            i = device.cursor % n
            device.cursor += 1
            predictor.predict(device.x[i], label=int(device.y[i]))
        with self._lock:
            self.stats.predictions += self.inferences_per_cycle
        return self.inferences_per_cycle

    def run_for(self, seconds: float, *, on_tick: Callable[[Fleet], None] | None = None) -> None:
        """Run (starting if needed) for ``seconds``, calling ``on_tick`` every few seconds."""
        if not self._threads:
            self.start()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            if on_tick is not None:
                on_tick(self)


def _trainer_handler(agent: Agent, *, device_seed: int) -> TaskHandler:
    """A ``train`` handler running :class:`devices_agent.federated.FederatedTrainer` on the device's data.

    The trainer is built on first use, after enrollment gave the agent its client; torch
    is imported only then.
    """
    holder: dict[str, Any] = {}

    def handle(task: Any) -> Any:
        from devices_agent.federated import FederatedTrainer

        trainer = holder.get("trainer")
        if trainer is None or trainer.client is not agent.client:
            x, y = agent.local_data
            trainer = FederatedTrainer(
                client=agent.client,  # type: ignore[arg-type]
                state_dir=agent.state.root,
                x=x,
                y=y,
                device_seed=device_seed,
                should_stop=agent.stopping.is_set,
            )
            holder["trainer"] = trainer
        return trainer.run_task(task)

    return handle
