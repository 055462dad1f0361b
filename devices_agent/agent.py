"""The agent's lifecycle: enroll once, then heartbeat, reconcile, run commands, flush metrics.

One :class:`Agent` is one board. :meth:`Agent.step` is one heartbeat cycle and is what
both the long-running loop (:meth:`Agent.run`) and the fleet simulator call:

1. re-send deployment reports that could not be delivered earlier;
2. ``POST heartbeat`` (seq, running version, latest deployment state, device state);
3. run the commands it returned and report each result;
4. reconcile the desired model (see :mod:`devices_agent.updater`);
5. hand training tasks to ``task_handlers["train"]`` (the federated trainer over the
   board's own examples, when a training backend is installed and ``train`` is on);
6. personalise the new model on the board's examples (when ``personalise`` is on);
7. load (or drop) the version the server asks to run in shadow (:mod:`devices_agent.shadow`);
8. flush the metrics outbox in batches.

Beside the loop, the local API (:mod:`devices_agent.local_api`) serves the application
that runs on the board: predictions with the model in use (the personal one when it
beats the global model on the local holdout), feedback and labelled examples, which go
to the board's sample store and are never sent anywhere.

Between cycles the agent waits for the interval the server returned (or the configured
override), or less when a websocket nudge arrives. After a failed heartbeat it waits a
full-jitter backoff delay instead, capped at the interval, so a fleet that lost its
server comes back spread out rather than all at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import random
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from devices_agent import __version__
from devices_agent.backends import available_backends
from devices_agent.client import AgentClient, AuthError, Backoff, ServerError, retry_call
from devices_agent.config import AgentConfig
from devices_agent.inference import resource_usage
from devices_agent.learning import (
    LocalData,
    ModelRuntime,
    NotEnoughData,
    Personaliser,
    PersonalResult,
    fetch_artifact,
    read_weights,
    spec_of,
)
from devices_agent.local_api import LocalApiServer, LocalService
from devices_agent.outbox import BufferedRecorder, Outbox, utc_now_iso
from devices_agent.samples import SampleStore
from devices_agent.shadow import ShadowModel, ShadowRunner
from devices_agent.state import AgentState, Credentials, InstalledModel
from devices_agent.updater import Outcome, Updater
from devices_agent.wire import (
    DEFAULT_HEARTBEAT_INTERVAL_S,
    ArtifactRef,
    Command,
    DesiredModel,
    DeviceState,
    DriftSketch,
    EnrollRequest,
    Hardware,
    HeartbeatRequest,
    HeartbeatResponse,
    Policy,
    TrainingTask,
)
from devices_agent.wire import ShadowModel as ShadowWire

__all__ = [
    "Agent",
    "EnrollmentError",
    "RestartRequested",
    "StepResult",
    "TaskHandler",
    "detect_hardware",
    "start_nudge_listener",
    "task_handlers",
]

log = logging.getLogger("devices_agent.agent")

TaskHandler = Callable[[TrainingTask], Any]

# Handlers of the tasks a heartbeat assigns, by kind, called as ``handler(task)``, shared
# by every Agent that is not given its own. An agent that trains adds its federated
# trainer as ``train`` to its own copy.
task_handlers: dict[str, TaskHandler] = {}


class EnrollmentError(RuntimeError):
    """Enrollment was refused (bad, used or expired token) or impossible (no token)."""


class RestartRequested(Exception):  # noqa: N818  (a control-flow signal, not an error)
    """A ``restart`` command asked the agent to restart; :meth:`Agent.run` handles it."""


def detect_hardware(overrides: dict[str, Any] | None = None) -> Hardware:
    """What the board is: CPU architecture, cores, RAM, OS, agent version (plus overrides)."""
    import os

    import psutil

    hardware: Hardware = {
        "arch": platform.machine() or "unknown",
        "cores": os.cpu_count() or 1,
        "ram_mb": int(psutil.virtual_memory().total / 1e6),
        "accelerator": "none",
        "os": f"{platform.system()} {platform.release()}".strip(),
        "agent_version": __version__,
        "python": platform.python_version(),
        "training_backends": available_backends(),
    }
    for key, value in (overrides or {}).items():
        hardware[key] = value  # type: ignore[literal-required]
    return hardware


@dataclass
class StepResult:
    """What one heartbeat cycle did."""

    ok: bool
    interval_s: float
    outcome: Outcome | None = None
    commands: int = 0
    metrics_sent: int = 0
    error: str = ""


@dataclass
class Agent:
    """One device's agent. Construct with a config; call :meth:`run` or :meth:`step`."""

    config: AgentConfig
    http: Any = None  # an httpx.Client to share (the simulator shares one pool)
    task_handlers: dict[str, TaskHandler] = field(default_factory=lambda: task_handlers)
    rng: random.Random = field(default_factory=random.Random)
    sleep: Callable[[float], None] = time.sleep
    # Extra device state to report (the simulator sets local_examples).
    device_state: DeviceState = field(default_factory=lambda: DeviceState())
    # Called with the new model after every activation or rollback (or None).
    on_model_change: Callable[[InstalledModel | None], None] | None = None
    counter: Any = None  # a devices_agent.client.WireCounter, for benchmarks
    # Builds the ONNX Runtime session of a model; the simulator shares sessions between
    # devices that run the same file. None: one session per agent.
    session_provider: Callable[[InstalledModel], Any] | None = None
    # Serve the local API on the configured socket/port (the in-process simulator calls
    # the service directly instead).
    serve_local_api: bool = True

    def __post_init__(self) -> None:
        self.state = AgentState(self.config.state_dir)
        self.outbox = Outbox(self.state.outbox_path, max_samples=self.config.outbox_max_samples)
        self.interval_s = float(self.config.heartbeat_interval_s or DEFAULT_HEARTBEAT_INTERVAL_S)
        self.backoff = Backoff(
            base_s=self.config.backoff_base_s, cap_s=self.config.backoff_cap_s, rng=self.rng
        )
        self.nudge = threading.Event()
        self.stopping = threading.Event()
        self.client: AgentClient | None = None
        self.updater: Updater | None = None
        self._drift_pending: DriftSketch | None = None
        self._drift_since = utc_now_iso()
        self.restart_requested = False
        self._done_tasks: list[tuple[str, int]] = []
        self._personalise_failed: set[int] = set()
        self._trainer: Any = None
        # Metric samples from the local API are buffered in memory and written in batches:
        # a database commit per prediction would cost more than the prediction.
        self.recorder = BufferedRecorder(self.outbox)
        self.samples = SampleStore(
            self.state.root / "samples.sqlite3",
            max_examples=self.config.samples_max,
            max_bytes=self.config.samples_max_bytes,
            max_age_s=self.config.samples_max_age_days * 86_400.0
            if self.config.samples_max_age_days
            else None,
            holdout_percent=self.config.holdout_percent,
        )
        self.data = LocalData(
            self.samples,
            data_dir=self.config.data_dir,
            entry_point=self.config.data_entry_point,
            holdout_percent=self.config.holdout_percent,
        )
        self.backends = (
            [b for b in available_backends() if b in self.config.training_backends]
            if self.config.train
            else []
        )
        # Personal heads are fine-tuned from the program with PyTorch: ONNX Runtime's
        # training artifacts come with a round, and a round trains every parameter.
        self.personaliser = (
            Personaliser(
                state_dir=self.state.root,
                data=self.data,
                record=self.record,
                backend="torch",
                epochs=self.config.personalise_epochs,
                min_examples=self.config.personalise_min_examples,
            )
            if self.config.personalise and "torch" in self.backends
            else None
        )
        self.runtime = ModelRuntime(
            self.state,
            personaliser=self.personaliser,
            session_provider=self.session_provider,
            extra_delay_ms=self.config.inference_delay_ms,
        )
        # A candidate run beside the active model on the same inputs (never answering).
        self.shadow = ShadowRunner(record=self.record, seed=self.rng.randrange(2**31))
        self._shadow_key: tuple[int, int, str] | None = None
        self._shadow_refused: set[tuple[int, str]] = set()
        self.local = LocalService(
            model=self.runtime.active,
            store=self.samples,
            record=self.record,
            status=lambda: {
                "device_id": self.device_id,
                "training_backends": self.backends,
                "shadow_version_id": self.shadow.model.version_id if self.shadow.model else None,
            },
            max_batch=self.config.local_api_max_batch,
            shadow=self.shadow,
        )
        self.local_server: LocalApiServer | None = None
        if self.backends and "train" not in self.task_handlers:
            # A board that can train takes part in rounds; its own copy of the handlers,
            # so one agent's trainer is never another's.
            self.task_handlers = {**self.task_handlers, "train": self._train_task}
        # What the server has already heard (see heartbeat_request).
        self._beats = 0
        # The last policy the server sent and its etag, kept across restarts so that a
        # restarted agent does not make the server resend an unchanged policy.
        saved = self.state.load()
        self.policy: Policy = dict(saved.get("policy") or {})  # type: ignore[assignment]
        self.policy_etag: str | None = saved.get("policy_etag") if self.policy else None
        self.desired: DesiredModel | None = saved.get("desired")
        self.desired_etag: str | None = saved.get("desired_etag") if self.desired else None
        self._report_sent: dict[str, Any] | None = None
        self._state_sent: DeviceState | None = None
        self._pending: tuple[dict[str, Any] | None, DeviceState | None] = (None, None)
        creds = self.state.credentials()
        if creds is not None:
            self._connect(creds)

    # --- setup -----------------------------------------------------------------------
    def _connect(self, creds: Credentials) -> None:
        if self.client is not None:
            self.client.close()
        self.client = AgentClient(
            server_url=self.config.server_url,
            secret=creds.secret,
            timeout_s=self.config.request_timeout_s,
            http=self.http,
            counter=self.counter,
            verify=self.config.tls_verify,
        )
        self.updater = Updater(
            state=self.state,
            client=self.client,
            public_key=creds.public_key_bytes(),
            on_activate=self._model_changed,
            sleep=self.sleep,
            health_runs=self.config.health_check_runs,
            inference_delay_ms=self.config.inference_delay_ms,
            keep_versions=self.config.keep_versions,
            backoff=Backoff(base_s=0.5, cap_s=10.0, rng=self.rng),
        )
        self.updater.recover()

    @property
    def credentials(self) -> Credentials | None:
        """The stored credentials (None before enrollment)."""
        return self.state.credentials()

    @property
    def device_id(self) -> str | None:
        creds = self.state.credentials()
        return creds.device_id if creds else None

    def close(self) -> None:
        """Stop the local API and release the outbox, the sample store and the HTTP pool."""
        self.stopping.set()
        if self.local_server is not None:
            self.local_server.stop()
            self.local_server = None
        self.shadow.close()
        if self.client is not None:
            self.client.close()
        self.recorder.flush()
        self.outbox.close()
        self.samples.close()

    def start_local_api(self) -> LocalApiServer | None:
        """Serve the local API on the configured socket (and loopback port); idempotent."""
        wanted = self.config.local_api_socket_path is not None or self.config.local_api_http
        if self.local_server is None and wanted:
            self.local_server = LocalApiServer(
                self.local,
                socket_path=self.config.local_api_socket_path,
                mode=int(self.config.local_api_mode),
                group=self.config.local_api_group,
                http=self.config.local_api_http,
            )
            self.local_server.start()
            log.info("local API on %s", self.config.local_api_socket_path or self.config.local_api_http)
        return self.local_server

    def enroll(self, *, max_attempts: int = 8) -> Credentials:
        """Enroll with the one-time token unless already enrolled; pins the server's key."""
        existing = self.state.credentials()
        if existing is not None:
            return existing
        if not self.config.enrollment_token:
            raise EnrollmentError("not enrolled and no enrollment_token configured")
        client = AgentClient(
            server_url=self.config.server_url,
            timeout_s=self.config.request_timeout_s,
            http=self.http,
            counter=self.counter,
            verify=self.config.tls_verify,
        )
        body: EnrollRequest = {
            "token": self.config.enrollment_token,
            "name": self.config.name or platform.node() or "board",
            "hardware": detect_hardware(self.config.hardware),
            "tags": list(self.config.tags),
        }
        try:
            answer = retry_call(
                lambda: client.enroll(body),
                backoff=self.backoff,
                max_attempts=max_attempts,
                sleep=self.sleep,
                should_stop=self.stopping.is_set,
            )
        except (AuthError, ServerError) as exc:
            if isinstance(exc, ServerError) and exc.retryable:
                raise
            raise EnrollmentError(f"enrollment refused: {exc}") from exc
        finally:
            if self.http is None:
                client.close()
        creds = Credentials(
            device_id=answer["device_id"],
            secret=answer["secret"],
            signing_public_key=answer["signing_public_key"],
            server_url=self.config.server_url,
        )
        self.state.save_credentials(creds)
        if answer.get("heartbeat_interval_s") and self.config.heartbeat_interval_s is None:
            self.interval_s = float(answer["heartbeat_interval_s"])
        log.info("enrolled as %s", creds.device_id)
        self._connect(creds)
        return creds

    # --- the model in use ------------------------------------------------------------
    def _model_changed(self, model: InstalledModel | None) -> None:
        self.runtime.invalidate()
        if self.on_model_change is not None:
            self.on_model_change(model)

    def record(self, name: str, value: float, version_id: int | None) -> None:
        """Queue one metric sample (buffered; written to the outbox in batches)."""
        self.recorder.add(name, value, version_id)

    # --- one cycle -------------------------------------------------------------------
    def heartbeat_request(self) -> HeartbeatRequest:
        """The next heartbeat body; advances and persists ``seq``.

        Heartbeats are the agent's steady traffic (1,440 a day at the default interval),
        so the body carries only what the server does not know yet: the agent version and
        clock on the first heartbeat after a start; the device state when it changed
        materially, and every ``state_every``-th heartbeat anyway; the latest deployment
        report until a heartbeat carrying it went through. The server keeps the last
        values of what is left out.
        """
        assert self.updater is not None
        usage = resource_usage()
        counts = self.data.counts()
        state: DeviceState = {
            "cpu_percent": round(usage["cpu_percent"]),
            "ram_mb": round(usage["ram_mb"]),
            "disk_free_mb": round(shutil.disk_usage(self.state.root).free / 1e6),
            # Counts only: the examples themselves never leave the board. Round selection
            # reads them, so a board without data is never asked to train.
            "local_examples": counts["local_examples"],
            "holdout_examples": counts["holdout_examples"],
            "training_backends": list(self.backends),
            **self.device_state,
        }
        body: HeartbeatRequest = {"seq": self.state.next_seq()}
        if self._beats == 0:
            body["sent_at"] = utc_now_iso()
            body["agent_version"] = __version__
        if self.policy_etag:
            body["policy_etag"] = self.policy_etag
        if self.desired_etag:
            body["desired_etag"] = self.desired_etag
        running = self.state.current_version_id()
        if running is not None:
            body["running_version_id"] = running
        report = self.updater.last_report()
        if report and report != self._report_sent:
            body["deployment"] = {"id": int(report["id"]), "state": report["state"]}
        every = max(1, self.config.state_every)
        if self._beats % every == 0 or _state_changed(self._state_sent, state):
            body["state"] = state
        self._pending = (report, state if "state" in body else None)
        return body

    def step(self) -> StepResult:
        """One heartbeat cycle (see the module docstring). Raises AuthError and RestartRequested."""
        if self.client is None or self.updater is None:
            self.enroll()
        assert self.client is not None and self.updater is not None
        try:
            self.updater.flush_reports()
            answer = self.heartbeat()
        except ServerError as exc:
            delay = min(self.backoff.delay(), max(self.interval_s, 1.0))
            log.warning("heartbeat failed (%s); next try in %.1f s", exc, delay)
            return StepResult(ok=False, interval_s=delay, error=str(exc))
        self.backoff.reset()
        if self.config.heartbeat_interval_s is None and answer.get("heartbeat_interval_s"):
            self.interval_s = float(answer["heartbeat_interval_s"])
        result = StepResult(ok=True, interval_s=self.interval_s)
        for command in answer.get("commands", []):
            self.run_command(command)
            result.commands += 1
        desired = self._take_desired(answer)
        result.outcome = self.updater.reconcile(desired, self.policy)
        self.run_tasks(answer)
        self.personalise(desired)
        self.sync_shadow(answer.get("shadow"))
        if (self._beats - 1) % max(1, self.config.state_every) == 0:
            # Resource use is sampled at the state cadence, not every heartbeat: on an
            # idle board a metrics batch every minute would double the daily traffic.
            resources = resource_usage()
            version_id = self.state.current_version_id()
            self.outbox.add_many(
                [
                    ("cpu_percent", resources["cpu_percent"], utc_now_iso(), version_id),
                    ("ram_mb", resources["ram_mb"], utc_now_iso(), version_id),
                ]
            )
        skipped, shadow_version = self.shadow.take_skipped()
        if skipped:
            self.record("shadow_skipped", float(skipped), shadow_version)
        result.metrics_sent = self.flush_metrics()
        if self.restart_requested:
            raise RestartRequested()
        return result

    def heartbeat(self) -> HeartbeatResponse:
        """Send one heartbeat and note what the server now knows; raises ServerError.

        Only the heartbeat: the answer's desired model, commands and tasks are acted on
        by :meth:`step`. The policy of the answer (or the kept one) is in ``self.policy``.
        """
        assert self.client is not None
        answer = self.client.heartbeat(self.heartbeat_request())
        self._beats += 1
        report, sent_state = self._pending
        self._report_sent = report
        if sent_state is not None:
            self._state_sent = sent_state
        self._take_policy(answer)
        every = self.config.drift_every
        if every > 0 and self._beats % every == 0:
            self.send_drift()
        return answer

    def send_drift(self) -> bool:
        """Send the drift sketch of the local API's inputs (and reset it); True when one was delivered.

        A sketch that could not be delivered for a retryable reason is kept and sent
        first next time; one the server refused is dropped, as a retry would not change it.
        """
        assert self.client is not None
        if self._drift_pending is None:
            taken = self.local.take_drift()
            if taken is not None:
                body = {
                    **taken,
                    "version_id": self.state.current_version_id(),
                    "window_start": self._drift_since,
                    "window_end": utc_now_iso(),
                }
                self._drift_pending = cast(DriftSketch, body)
                self._drift_since = utc_now_iso()
        if self._drift_pending is None:
            return False
        try:
            answer = self.client.send_drift(self._drift_pending)
            if isinstance(answer, dict) and isinstance(answer.get("feature_bins"), dict):
                # The reference's bins: the next windows count their features over them,
                # so the server can compare each feature's distribution (its PSI).
                self.local.set_drift_bins(answer["feature_bins"])
        except ServerError as exc:
            if exc.retryable:
                log.info("drift sketch not delivered: %s", exc)
                return False
            log.warning("drift sketch refused, dropped: %s", exc)
        self._drift_pending = None
        return True

    def _take_desired(self, answer: HeartbeatResponse) -> DesiredModel | None:
        """The desired model of an answer, or the kept one when only its etag came back.

        The server sends the desired model only when its etag differs from the one this
        agent sent (it rarely changes, and it is most of a heartbeat's answer); no etag
        and no model means no model is wanted.
        """
        etag = answer.get("desired_etag")
        desired = answer.get("desired")
        if desired is not None:
            self.desired, self.desired_etag = desired, etag
            self.state.update(desired=dict(desired), desired_etag=etag)
        elif etag is None:
            if self.desired is not None:
                self.desired, self.desired_etag = None, None
                self.state.update(desired=None, desired_etag=None)
        elif etag != self.desired_etag:
            # Not expected (the server sends the model when the etags differ); ask again.
            self.desired_etag = None
            return None
        return self.desired

    def _take_policy(self, answer: HeartbeatResponse) -> None:
        """Keep the policy of a heartbeat answer, or the last one when it was left out.

        The server sends the policy only when its etag differs from the one this agent
        sent; the time-varying part (``in_window``) comes with every answer. A server
        that predates etags sends the whole policy every time and no etag.
        """
        policy = answer.get("policy")
        etag = answer.get("policy_etag")
        if policy is not None:
            self.policy = dict(policy)  # type: ignore[assignment]
            if etag is not None and etag != self.policy_etag:
                self.state.update(policy=dict(policy), policy_etag=etag)
            self.policy_etag = etag
        elif etag is not None and etag != self.policy_etag:
            # Not expected (the server sends the policy whenever the etags differ); ask
            # for it again rather than act on a policy known to be stale.
            self.policy_etag = None
        if "in_window" in answer:
            inside = bool(answer["in_window"])
            # The size limit (the rest of the server's download_allowed) is checked by
            # the updater against the artifact it is about to fetch.
            self.policy["in_maintenance_window"] = inside
            self.policy["download_allowed"] = inside

    def run_tasks(self, answer: HeartbeatResponse) -> None:
        """Hand each assigned task to its registered handler, once per round.

        A task stays in the heartbeat until its round closes; one that a handler finished
        here is not handed over again. A failing handler is logged and retried on the
        next heartbeat.
        """
        for task in answer.get("tasks", []):
            kind = str(task.get("kind", ""))
            handler = self.task_handlers.get(kind)
            key = (kind, int(task.get("round_id", 0)))
            if handler is None or key in self._done_tasks:
                continue
            try:
                handler(task)
            except AuthError:
                raise
            except Exception:
                log.exception("task handler %s failed for %s", kind, task)
                continue
            self._done_tasks.append(key)
            del self._done_tasks[:-100]

    def _artifact(self, ref: ArtifactRef, version_id: int) -> bytes:
        assert self.client is not None and self.updater is not None
        path = fetch_artifact(
            client=self.client,
            ref=ref,
            public_key=self.updater.public_key,
            folder=self.state.root / "artifacts",
            version_id=version_id,
        )
        return path.read_bytes()

    def sync_shadow(self, wanted: ShadowWire | None) -> ShadowModel | None:
        """Run the shadow version the server names (None: stop shadowing); returns it.

        The candidate's ONNX graph comes through :func:`fetch_artifact`, after its signed
        statement verified for this version, family, number and kind ``onnx`` (a refused
        artifact is remembered and not fetched again). It is kept under
        ``<state_dir>/shadow`` and never installed as the active model.
        """
        if wanted is None:
            if self.shadow.model is not None:
                log.info("shadow of version %s stopped", self.shadow.model.version_id)
            self.shadow.set_model(None)
            self._shadow_key = None
            return None
        assert self.client is not None and self.updater is not None
        ref = wanted["artifact"]
        version_id = int(wanted["version_id"])
        key = (int(wanted["shadow_id"]), version_id, str(ref.get("sha256", "")))
        current = self.shadow.model
        if current is not None and self._shadow_key == key:
            # The same candidate: only the policy may have changed.
            current.sample_rate = float(wanted["sample_rate"])
            current.max_cpu_percent = wanted.get("max_cpu_percent")
            current.budget_ms = wanted.get("budget_ms")
            current.tolerance = float(wanted.get("tolerance") or 0.0)
            return current
        if (version_id, key[2]) in self._shadow_refused:
            return None
        from devices_agent.family import FamilySpec, SpecError
        from devices_agent.inference import load_session
        from devices_agent.updater import VerificationError, verify_statement

        try:
            if ref.get("kind") != "onnx":
                raise VerificationError(f"a shadow runs an ONNX graph, not a {ref.get('kind')!r} artifact")
            verify_statement(
                ref,
                public_key=self.updater.public_key,
                kind="onnx",
                version_id=version_id,
                family=wanted.get("family") or None,
                number=wanted.get("number"),
                now=time.time(),
            )
            path = fetch_artifact(
                client=self.client,
                ref=ref,
                public_key=self.updater.public_key,
                folder=self.state.root / "shadow",
                version_id=version_id,
                keep=2,
            )
            raw_spec = wanted.get("spec")
            spec = FamilySpec.from_dict(dict(raw_spec)) if raw_spec else None
            if spec is None:
                active = self.runtime.active()
                if active is None:
                    return None
                spec = active.spec
            session = load_session(path)
        except (VerificationError, SpecError) as exc:
            log.warning("shadow version %s refused: %s", version_id, exc)
            self._shadow_refused.add((version_id, key[2]))
            self.shadow.set_model(None)
            self._shadow_key = None
            return None
        except ServerError as exc:
            log.warning("shadow version %s not fetched yet: %s", version_id, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - a candidate that does not load is refused
            log.warning("shadow version %s does not load: %s", version_id, exc)
            self._shadow_refused.add((version_id, key[2]))
            return None
        model = ShadowModel(
            shadow_id=key[0],
            version_id=version_id,
            spec=spec,
            session=session,
            sample_rate=float(wanted["sample_rate"]),
            max_cpu_percent=wanted.get("max_cpu_percent"),
            budget_ms=wanted.get("budget_ms"),
            tolerance=float(wanted.get("tolerance") or 0.0),
        )
        self.shadow.set_model(model)
        self._shadow_key = key
        log.info("shadowing version %s (sample rate %s)", version_id, model.sample_rate)
        return model

    def personalise(self, desired: DesiredModel | None) -> PersonalResult | None:
        """Fine-tune a personal head once the desired version is active here (when enabled).

        Runs after the heartbeat's answer was acted on, in the agent's loop, with one torch
        thread. The version's program and weights are fetched as signed artifacts. Only
        the two metrics are queued for the server; the head stays under
        ``<state_dir>/personal``. Too few examples postpone it; a failure is logged and
        not retried for the same version, so a broken artifact does not cost CPU every beat.
        """
        if self.personaliser is None or desired is None:
            return None
        version_id = int(desired["version_id"])
        program_ref, weights_ref, head = desired.get("program"), desired.get("weights"), desired.get("head")
        current = self.state.current()
        if (
            current is None
            or current.version_id != version_id
            or not program_ref
            or not weights_ref
            or not head
        ):
            return None
        if version_id in self._personalise_failed or not self.personaliser.needs(version_id):
            return None
        spec = spec_of(current)
        if spec is None:
            return None
        try:
            program = self._artifact(program_ref, version_id)
            weights = read_weights(self.state.root / "artifacts" / weights_ref["sha256"])
            result = self.personaliser.personalise(
                version_id=version_id, spec=spec, program=program, global_state=weights, head=list(head)
            )
        except FileNotFoundError:
            try:
                self._artifact(weights_ref, version_id)
            except ServerError as exc:
                log.warning("personalisation of v%s postponed: %s", version_id, exc)
            return None
        except NotEnoughData as exc:
            log.debug("personalisation of v%s waits for data: %s", version_id, exc)
            return None
        except AuthError:
            raise
        except ServerError as exc:
            # Transient: the next cycle tries again.
            log.warning("personalisation of v%s postponed: %s", version_id, exc)
            return None
        except Exception:
            log.exception("personalisation of v%s failed", version_id)
            self._personalise_failed.add(version_id)
            return None
        self.runtime.invalidate()
        log.info(
            "personalised v%s (%s): global %s %.3f, personal %.3f, serving %s",
            version_id,
            result.rebase,
            result.metric,
            result.global_value,
            result.personal_value,
            "personal" if result.used else "global",
        )
        return result

    def _device_seed(self) -> int:
        if self.config.device_seed is not None:
            return int(self.config.device_seed)
        # Differs between boards (their local shuffling too), fixed for one board.
        return int(hashlib.sha256(str(self.device_id).encode()).hexdigest()[:8], 16)

    def _train_task(self, task: TrainingTask) -> Any:
        """The ``train`` handler: the federated trainer over the board's own examples."""
        from devices_agent.federated import FederatedTrainer

        assert self.client is not None and self.updater is not None
        if self._trainer is None or self._trainer.client is not self.client:
            self._trainer = FederatedTrainer(
                client=self.client,
                state_dir=self.state.root,
                data=self.data,
                public_key=self.updater.public_key,
                backends=self.backends,
                device_seed=self._device_seed(),
                should_stop=self.stopping.is_set,
            )
        outcome = self._trainer.run_task(task)
        log.info("round %s: %s %s", outcome.round_id, outcome.status, outcome.code)
        return outcome

    def flush_metrics(self) -> int:
        """Send queued metrics in batches until empty, an error, or the per-flush limit."""
        assert self.client is not None
        self.recorder.flush()
        sent = 0
        for _ in range(self.config.max_batches_per_flush):
            batch = self.outbox.next_batch(max_samples=self.config.metrics_batch_size)
            if batch is None:
                break
            try:
                self.client.send_metrics({"batch_id": batch.batch_id, "samples": batch.samples})
            except ServerError as exc:
                if exc.retryable:
                    # The batch keeps its id; the next flush re-sends it unchanged.
                    log.info("metrics batch %s not delivered: %s", batch.batch_id, exc)
                    break
                # A 4xx will not change on a retry; dropping it keeps the queue moving.
                log.warning("metrics batch %s refused, dropped: %s", batch.batch_id, exc)
            self.outbox.ack(batch.batch_id)
            sent += len(batch.samples)
        return sent

    # --- commands --------------------------------------------------------------------
    def run_command(self, command: Command) -> None:
        """Run one operator command and report its result."""
        assert self.client is not None
        kind = command.get("kind", "")
        args = command.get("args", {}) or {}
        ok = True
        try:
            if kind == "restart":
                result: dict[str, Any] = {"restarting": True}
                self.restart_requested = True
            elif kind == "collect_logs":
                result = {"log": self.log_tail(int(args.get("lines", 200)))}
            elif kind == "diagnostics":
                result = self.diagnostics()
            else:
                ok, result = False, {"error": f"unknown command {kind!r}"}
        except Exception as exc:
            ok, result = False, {"error": f"{type(exc).__name__}: {exc}"}
        try:
            retry_call(
                lambda: self.client.report_command(command["id"], {"ok": ok, "result": result}),  # type: ignore[union-attr]
                backoff=Backoff(base_s=0.5, cap_s=5.0, rng=self.rng),
                max_attempts=3,
                sleep=self.sleep,
            )
        except ServerError as exc:
            log.warning("command %s result not delivered: %s", command.get("id"), exc)

    def log_tail(self, lines: int = 200) -> str:
        """The last ``lines`` lines of the agent log (at most 64 KiB)."""
        path = self.config.log_path
        if not path.exists():
            return ""
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            text = fh.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-max(1, lines) :])

    def diagnostics(self) -> dict[str, Any]:
        """Versions, disk, memory and ONNX Runtime providers, for the ``diagnostics`` command."""
        import sys

        import onnxruntime
        import psutil

        disk = shutil.disk_usage(self.state.root)
        memory = psutil.virtual_memory()
        return {
            "agent_version": __version__,
            "python": sys.version.split()[0],
            "onnxruntime": onnxruntime.__version__,
            "providers": list(onnxruntime.get_available_providers()),
            "running_version_id": self.state.current_version_id(),
            "last_good_version_id": self.state.last_good_version_id(),
            "installed_versions": self.state.installed_versions(),
            "disk_free_mb": round(disk.free / 1e6, 1),
            "disk_total_mb": round(disk.total / 1e6, 1),
            "memory_available_mb": round(memory.available / 1e6, 1),
            "rss_mb": round(psutil.Process().memory_info().rss / 1e6, 1),
            "outbox_pending": self.outbox.pending(),
            "torch_loaded": "torch" in sys.modules,
            "training_backends": list(self.backends),
            **self.data.counts(),
        }

    # --- the loop --------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """A JSON-ready summary of the local state (the ``status`` subcommand)."""
        current = self.state.current()
        return {
            "device_id": self.device_id,
            "server_url": self.config.server_url,
            "enrolled": self.device_id is not None,
            "current_version_id": current.version_id if current else None,
            "current_label": current.label if current else None,
            "last_good_version_id": self.state.last_good_version_id(),
            "installed_versions": self.state.installed_versions(),
            "deployment": self.state.load().get("deployment"),
            "last_report": self.state.load().get("deployment_report"),
            "seq": self.state.load().get("seq", 0),
            "outbox_pending": self.outbox.pending(),
            "outbox_dropped": self.outbox.counter("dropped"),
        }

    def wait(self, seconds: float) -> None:
        """Sleep until the next cycle, a nudge, or stop."""
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            if self.nudge.wait(timeout=min(remaining, 1.0)):
                self.nudge.clear()
                return

    def run(self, *, max_steps: int | None = None) -> None:
        """Run until :meth:`stop` (or ``max_steps`` cycles). Restart commands re-run the loop.

        An unreachable server at first start is waited out (full-jitter backoff), not
        fatal; a refused token (:class:`EnrollmentError`) or refused credentials
        (:class:`AuthError`) end the loop with that error.
        """
        while not self.stopping.is_set():
            try:
                self.enroll()
                break
            except ServerError as exc:
                delay = self.backoff.delay()
                log.warning("cannot enroll yet (%s); next try in %.1f s", exc, delay)
                self.wait(delay)
        if self.stopping.is_set():
            return
        if self.serve_local_api:
            self.start_local_api()
        if self.config.websocket:
            start_nudge_listener(self)
        steps = 0
        while not self.stopping.is_set():
            try:
                result = self.step()
            except RestartRequested:
                log.info("restart command: restarting the loop")
                self.restart_requested = False
                creds = self.state.credentials()
                assert creds is not None
                self._connect(creds)
                self.runtime.invalidate()
                continue
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return
            self.wait(result.interval_s)

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current cycle."""
        self.stopping.set()
        self.nudge.set()


def _state_changed(before: DeviceState | None, now: DeviceState) -> bool:
    """Whether the device state moved enough to be worth a few bytes on the next heartbeat."""
    if before is None:
        return True
    for key, value in now.items():
        old = before.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not isinstance(old, int | float):
            if value != old:
                return True
            continue
        # Relative thresholds: CPU load and free memory jitter constantly; a change of a
        # quarter (or 5 % of free disk) is news, a wobble is not.
        tolerance = 0.05 if key == "disk_free_mb" else 0.25
        if abs(float(value) - float(old)) > tolerance * max(abs(float(old)), 1.0) + (
            10 if key == "cpu_percent" else 0
        ):
            return True
    return False


def start_nudge_listener(agent: Agent) -> threading.Thread:
    """Listen on ``/ws/agent/`` for ``{"type": "nudge"}`` and heartbeat early when one arrives.

    Runs in a daemon thread. When the socket cannot connect (no websocket on the server,
    a proxy in between) it retries quietly with backoff; the interval keeps working.
    """
    thread = threading.Thread(target=_nudge_loop, args=(agent,), name="agent-nudge", daemon=True)
    thread.start()
    return thread


def _nudge_loop(agent: Agent) -> None:
    from websockets.exceptions import WebSocketException
    from websockets.sync.client import connect

    url = (
        agent.config.server_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + "/ws/agent/"
    )
    backoff = Backoff(base_s=2.0, cap_s=300.0, rng=random.Random())
    verify = agent.config.tls_verify
    # websockets takes a context (or none for the system's CAs); the same trust as the API.
    tls = verify if isinstance(verify, ssl.SSLContext) else None
    while not agent.stopping.is_set():
        creds = agent.state.credentials()
        if creds is None:
            agent.stopping.wait(5.0)
            continue
        try:
            with connect(
                url,
                additional_headers={"Authorization": f"Device {creds.secret}"},
                open_timeout=10,
                close_timeout=2,
                ssl=tls if url.startswith("wss://") else None,
            ) as socket:
                backoff.reset()
                while not agent.stopping.is_set():
                    try:
                        raw = socket.recv(timeout=5.0)
                    except TimeoutError:
                        continue
                    try:
                        message = json.loads(raw)
                    except ValueError:
                        continue
                    if isinstance(message, dict) and message.get("type") == "nudge":
                        agent.nudge.set()
        except (OSError, WebSocketException, TimeoutError) as exc:
            log.debug("nudge socket unavailable: %s", exc)
        agent.stopping.wait(backoff.delay())
