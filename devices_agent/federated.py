"""The device side of a federated round: fetch the task, train locally, upload the delta.

A ``train`` task (from the heartbeat's ``tasks`` or ``GET rounds/``) names a round. The
trainer fetches ``rounds/<id>/task``, the version's program (a signed artifact) and the
round's global weights (checked against their SHA-256), measures the global model on the
board's holdout (the federated evaluation of the version the round starts from), trains
on the board's own examples with a training backend (:mod:`devices_agent.backends`),
clips when the job asks, encodes the delta of the trainable parameters with the job's
codec and uploads it with retries. A board with no backend the job accepts, or no
examples, skips the round and says why.

The backend is the first of the board's that the job accepts and whose artifact the task
carries: the program for ``torch``, the version's ONNX Runtime training artifacts
(``ort_training``) for ``ort``. An artifact whose digest or signature does not match, or
artifacts that do not fit the round's weights, end the board's part in the round: it
reports the failure (``POST rounds/<id>/failure``, a code and a message), so the server
records why and the round goes on without waiting for it.

Everything in between lives in ``<state_dir>/federated/round_<id>/``, so an agent that is
killed resumes where it stopped: downloaded weights are reused, and a delta that was
encoded but not acknowledged is uploaded again byte for byte (the server answers 200 for
identical bytes, so a retried upload is idempotent per (round, device)). For the top-k
codec the error-feedback residual (what was not sent) is kept in
``<state_dir>/federated/topk_residual.safetensors`` and only replaced once the server
acknowledged the upload that produced it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from devices_agent.backends import Backend, TrainConfig, available_backends, get_backend
from devices_agent.client import AgentClient, Backoff, ServerError, raise_for_response, retry_call
from devices_agent.codecs import decode_tensors, encode_delta, encode_tensors
from devices_agent.family import FamilySpec, SpecError
from devices_agent.learning import fetch_artifact
from devices_agent.updater import DownloadError, VerificationError
from devices_agent.wire import AUTH_SCHEME, ArtifactRef

__all__ = [
    "FederatedTrainer",
    "FixedData",
    "RoundOutcome",
    "TrainingData",
    "local_seed",
    "register",
    "run_rounds",
]

Weights = dict[str, npt.NDArray[np.float32]]
Arrays = tuple[npt.NDArray[Any], npt.NDArray[Any]]


class TrainingData(Protocol):
    """Where a trainer reads the board's examples (``devices_agent.learning.LocalData``)."""

    def training_set(self, spec: FamilySpec) -> Arrays | None: ...

    def holdout_set(self, spec: FamilySpec) -> Arrays | None: ...


class FixedData:
    """Examples given once, as arrays (benchmarks and tests that compare with a plain loop)."""

    def __init__(self, x: npt.ArrayLike, y: npt.ArrayLike, *, holdout: Arrays | None = None) -> None:
        self.x = np.asarray(x)
        self.y = np.asarray(y)
        self.holdout = holdout

    def training_set(self, spec: FamilySpec) -> Arrays | None:
        return (spec.inputs(self.x), spec.labels(self.y, count=len(self.x))) if len(self.x) else None

    def holdout_set(self, spec: FamilySpec) -> Arrays | None:
        if self.holdout is None:
            return None
        x, y = self.holdout
        return spec.inputs(x), spec.labels(y, count=len(x))


def local_seed(*, task_seed: int, device_seed: int) -> int:
    """The local training seed: differs per device and per round, fixed for a retry."""
    return (int(task_seed) * 7919 + int(device_seed)) % (2**31 - 1)


@dataclass
class RoundOutcome:
    """What happened to one task: ``status`` is uploaded, duplicate, rejected, skipped or failed
    (reported to the server, which records why)."""

    round_id: int
    status: str
    code: str = ""
    message: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    # Where the board's time went (seconds): ``download_s`` (program and weights),
    # ``train_s`` (local evaluation, training, encoding), ``upload_s``; and ``received_at``,
    # the wall-clock time (``time.time()``) at which the task reached the trainer.
    timings: dict[str, float] = field(default_factory=dict)


class _Skip(Exception):  # noqa: N818  (a reason not to take part, not an error)
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Failed(Exception):  # noqa: N818  (reported to the server, not raised further)
    def __init__(self, code: str, message: str, backend: str) -> None:
        super().__init__(message)
        self.code = code
        self.backend = backend


def _failure_code(exc: ValueError) -> str:
    """The code a board reports for a failure that retrying cannot fix."""
    if isinstance(exc, VerificationError):
        return "artifact_unverified"
    if isinstance(exc, DownloadError):
        return "artifact_unavailable"
    code = getattr(exc, "code", "")
    return str(code) if isinstance(code, str) and code else "training_failed"


def _atomic_write(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` in one step; ``durable`` waits for the disk (a file
    read back only after checking its digest may skip that: a torn copy is fetched again)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        if durable:
            handle.flush()
            os.fsync(handle.fileno())
    os.replace(tmp, path)


class FederatedTrainer:
    """Runs ``train`` tasks for one board.

    ``data`` holds the board's examples; ``public_key`` is the server's pinned signing key
    (programs are signed artifacts); ``device_seed`` makes its shuffling differ from other
    boards'. ``should_stop`` is polled between batches (an agent shutting down stops
    training; the task is retried from the start next time).
    """

    def __init__(
        self,
        *,
        client: AgentClient,
        state_dir: str | os.PathLike[str],
        data: TrainingData,
        public_key: bytes | None,
        backends: list[str] | None = None,
        device_seed: int = 0,
        num_threads: int | None = 1,
        max_attempts: int = 6,
        backoff: Backoff | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> None:
        self.client = client
        self.root = Path(state_dir) / "federated"
        self.root.mkdir(parents=True, exist_ok=True)
        self.data = data
        self.public_key = public_key
        self.backends = list(backends) if backends is not None else available_backends()
        self.device_seed = device_seed
        self.num_threads = num_threads
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff(base_s=0.2, cap_s=10.0)
        self.should_stop = should_stop
        self._backends: dict[str, Backend] = {}
        self._timings: dict[str, float] = {}

    # ------------------------------------------------------------------ helpers
    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Authorization": f"{AUTH_SCHEME} {self.client.secret}"} if self.client.secret else {}
        headers.update(extra or {})
        return headers

    def _retry(self, fn: Callable[[], Any]) -> Any:
        return retry_call(
            fn, backoff=self.backoff, max_attempts=self.max_attempts, should_stop=self.should_stop
        )

    def _task(self, round_id: int) -> dict[str, Any]:
        response = self._retry(lambda: self.client.request("GET", f"rounds/{int(round_id)}/task"))
        data: dict[str, Any] = response.json()
        return data

    def _weights(self, task: Mapping[str, Any], folder: Path) -> tuple[Weights, int]:
        """The round's global weights, from the local copy when an earlier try fetched them."""
        path = folder / "global.safetensors"
        want = str(task["weights_sha256"])
        downloaded = 0
        data = path.read_bytes() if path.exists() else b""
        if hashlib.sha256(data).hexdigest() != want:
            response = self._retry(lambda: self.client.request("GET", str(task["weights_url"])))
            data = response.content
            downloaded = len(data)
            if hashlib.sha256(data).hexdigest() != want:
                raise ServerError("global weights do not match their digest", retryable=True)
            # Checked against its digest before any reuse, so no need to wait for the disk.
            _atomic_write(path, data, durable=False)
        tensors, _ = decode_tensors(data)
        return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}, downloaded

    def _residual(self, names: list[str]) -> Weights | None:
        path = self.root / "topk_residual.safetensors"
        if not path.exists():
            return None
        tensors, _ = decode_tensors(path.read_bytes())
        if set(tensors) != set(names):
            return None  # the model changed shape: start error feedback afresh
        return {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}

    def _program(self, ref: ArtifactRef, version_id: int) -> bytes:
        if self.public_key is None:
            raise ServerError("no pinned signing key to check the program with", retryable=False)
        path = fetch_artifact(
            client=self.client,
            ref=ref,
            public_key=self.public_key,
            folder=self.root.parent / "artifacts",
            version_id=version_id,
        )
        return path.read_bytes()

    def _backend(self, task: Mapping[str, Any]) -> Backend | None:
        """The first of the board's backends that the job accepts and the task has artifacts for."""
        accepted = list(task.get("backends") or ["torch"])
        for name in self.backends:
            if name not in accepted:
                continue
            if name not in self._backends:
                options: dict[str, Any] = {"num_threads": self.num_threads}
                if name == "ort":
                    options["cache_dir"] = self.root.parent / "ort"
                self._backends[name] = get_backend(name, **options)
            backend = self._backends[name]
            if task.get(backend.artifact):
                return backend
        return None

    def _no_backend(self, task: Mapping[str, Any]) -> _Skip:
        accepted = task.get("backends")
        usable = [b for b in self.backends if b in (accepted or ["torch"])]
        if usable:
            return _Skip(
                "no_artifacts",
                f"the round carries no artifacts for this board's backends {usable} "
                "(a version not trainable with ONNX Runtime, or its artifacts not built yet)",
            )
        return _Skip("no_backend", f"this board trains with {self.backends}; the job accepts {accepted}")

    def _prepare_upload(self, task: Mapping[str, Any], folder: Path) -> tuple[bytes, dict[str, Any], int]:
        """The encoded delta and its headers, trained now or recovered from an earlier try."""
        payload_path = folder / "upload.safetensors"
        meta_path = folder / "upload.json"
        if payload_path.exists() and meta_path.exists():
            return payload_path.read_bytes(), json.loads(meta_path.read_text()), 0
        spec = FamilySpec.from_dict(task["spec"])
        backend = self._backend(task)
        if backend is None:
            raise self._no_backend(task)
        data = self.data.training_set(spec)
        if data is None or len(data[0]) == 0:
            raise _Skip("no_data", "this board holds no labelled examples for the family")
        try:
            started = time.perf_counter()
            program = self._program(task[backend.artifact], int(task["base_version_id"]))
            weights, downloaded = self._weights(task, folder)
            self._timings["download_s"] = time.perf_counter() - started
            started = time.perf_counter()
            metrics: dict[str, float] = {}
            holdout = self.data.holdout_set(spec)
            if holdout is not None and len(holdout[0]):
                # The global model on data no model was trained on: the round's base
                # version, evaluated where the data lives.
                measured = backend.evaluate(
                    program=program, state=weights, spec=spec, x=holdout[0], y=holdout[1]
                )
                metrics[f"holdout_{spec.primary_metric}"] = float(measured[spec.primary_metric])
                metrics["holdout_loss"] = float(measured["loss"])
                metrics["holdout_examples"] = float(len(holdout[0]))
            train = task["train"]
            result = backend.train(
                program=program,
                state=weights,
                spec=spec,
                x=data[0],
                y=data[1],
                config=TrainConfig(
                    epochs=int(train["epochs"]),
                    batch_size=int(train["batch_size"]),
                    lr=float(train["lr"]),
                    optimizer=str(train.get("optimizer", "sgd")),
                    prox_mu=float(train.get("prox_mu", 0.0)),
                    clip_norm=float(task["clip_norm"]) if task.get("clip_norm") else None,
                    seed=local_seed(task_seed=int(task["seed"]), device_seed=self.device_seed),
                ),
                trainable=list(task.get("trainable") or []) or None,
                should_stop=self.should_stop,
            )
        except SpecError:
            raise
        except ValueError as exc:
            raise _Failed(_failure_code(exc), str(exc), backend.name) from exc
        if result.metrics.get("stopped"):
            raise InterruptedError("local training was stopped")
        metrics.update(result.metrics)
        metrics["backend_" + backend.name] = 1.0
        codec = str(task.get("codec", "none"))
        residual = self._residual(list(result.delta)) if codec == "topk" else None
        encoded = encode_delta(
            result.delta, codec=codec, topk_fraction=float(task.get("topk_fraction", 0.1)), residual=residual
        )
        if encoded.residual is not None:
            _atomic_write(folder / "residual.safetensors", encode_tensors(encoded.residual))
        meta = {"num_examples": result.num_examples, "metrics": metrics, "backend": backend.name}
        _atomic_write(payload_path, encoded.data)
        _atomic_write(meta_path, json.dumps(meta).encode())
        self._timings["train_s"] = time.perf_counter() - started
        return encoded.data, meta, downloaded

    def _commit(self, folder: Path) -> None:
        """The server has the update: keep its residual and forget the round's files."""
        residual = folder / "residual.safetensors"
        if residual.exists():
            os.replace(residual, self.root / "topk_residual.safetensors")
        shutil.rmtree(folder, ignore_errors=True)

    # ------------------------------------------------------------------ the task
    def run_task(self, task: Mapping[str, Any]) -> RoundOutcome:
        """Run one ``train`` task (``{"round_id": ...}``) to the end; never raises for a
        refusal by the server, which is reported in the outcome instead."""
        round_id = int(task["round_id"])
        self._timings = {"received_at": time.time()}
        folder = self.root / f"round_{round_id}"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            # The long poll of GET rounds/ carries the task body; a heartbeat's task does
            # not, and then it is fetched.
            given = task.get("config")
            config = dict(given) if isinstance(given, Mapping) else self._task(round_id)
        except ServerError as exc:
            if exc.retryable:
                raise
            shutil.rmtree(folder, ignore_errors=True)
            return RoundOutcome(round_id, "skipped", code=exc.code, message=str(exc))
        if config.get("evaluate_only"):
            return self._evaluate_task(config, folder)
        try:
            data, meta, downloaded = self._prepare_upload(config, folder)
        except (_Skip, SpecError) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            code = exc.code if isinstance(exc, _Skip | SpecError) else "skipped"
            return RoundOutcome(round_id, "skipped", code=code, message=str(exc))
        except _Failed as exc:
            return self._report_failure(config, folder, exc)
        headers = self._headers(
            {
                "Content-Type": "application/octet-stream",
                "X-Num-Examples": str(int(meta["num_examples"])),
                "X-Metrics": json.dumps(meta["metrics"]),
                "X-Backend": str(meta.get("backend", "")),
            }
        )
        url = self.client.url(str(config["update_url"]))

        def post() -> Any:
            import httpx

            try:
                response = self.client.http.post(url, content=data, headers=headers)
            except httpx.TransportError as exc:
                raise ServerError(f"POST {url}: {exc}", retryable=True) from exc
            if self.client.counter is not None:
                self.client.counter.add(response)
            raise_for_response(response)
            return response

        metrics = {k: float(v) for k, v in meta["metrics"].items()}
        started = time.perf_counter()
        try:
            self._retry(post)
        except ServerError as exc:
            if exc.retryable:
                raise
            if exc.code == "duplicate_update":
                self._commit(folder)
                return RoundOutcome(round_id, "duplicate", code=exc.code, message=str(exc), metrics=metrics)
            shutil.rmtree(folder, ignore_errors=True)
            return RoundOutcome(
                round_id, "rejected", code=exc.code, message=str(exc), bytes_up=len(data), metrics=metrics
            )
        self._timings["upload_s"] = time.perf_counter() - started
        self._timings["uploaded_at"] = time.time()
        self._commit(folder)
        return RoundOutcome(
            round_id,
            "uploaded",
            bytes_up=len(data),
            bytes_down=downloaded,
            metrics=metrics,
            timings=dict(self._timings),
        )

    def _report_failure(self, task: Mapping[str, Any], folder: Path, failure: _Failed) -> RoundOutcome:
        """Tell the server why this board cannot take part (``POST rounds/<id>/failure``)."""
        round_id = int(task["round_id"])
        shutil.rmtree(folder, ignore_errors=True)
        body = {"code": failure.code[:40], "message": str(failure)[:2000], "backend": failure.backend}
        url = str(task.get("failure_url") or f"rounds/{round_id}/failure")
        try:
            self._retry(lambda: self.client.request("POST", url, json_body=body))
        except ServerError as exc:
            if exc.retryable:
                raise
        return RoundOutcome(round_id, "failed", code=failure.code, message=str(failure))

    def _evaluate_task(self, task: Mapping[str, Any], folder: Path) -> RoundOutcome:
        """An evaluation round: the global model on this board's holdout, and only the numbers sent."""
        round_id = int(task["round_id"])
        try:
            spec = FamilySpec.from_dict(task["spec"])
            backend = self._backend(task)
            if backend is None:
                raise self._no_backend(task)
            holdout = self.data.holdout_set(spec)
            if holdout is None or not len(holdout[0]):
                raise _Skip("no_holdout", "nothing to evaluate on this board")
            try:
                program = self._program(task[backend.artifact], int(task["base_version_id"]))
                weights, downloaded = self._weights(task, folder)
                measured = backend.evaluate(
                    program=program, state=weights, spec=spec, x=holdout[0], y=holdout[1]
                )
            except SpecError:
                raise
            except ValueError as exc:
                raise _Failed(_failure_code(exc), str(exc), backend.name) from exc
        except (_Skip, SpecError) as exc:
            shutil.rmtree(folder, ignore_errors=True)
            return RoundOutcome(round_id, "skipped", code=exc.code, message=str(exc))
        except _Failed as exc:
            return self._report_failure(task, folder, exc)
        metrics = {
            f"holdout_{spec.primary_metric}": float(measured[spec.primary_metric]),
            "holdout_loss": float(measured["loss"]),
            "holdout_examples": float(len(holdout[0])),
        }
        try:
            self._retry(
                lambda: self.client.request(
                    "POST", str(task["evaluation_url"]), json_body={"metrics": metrics}
                )
            )
        except ServerError as exc:
            if exc.retryable:
                raise
            shutil.rmtree(folder, ignore_errors=True)
            status = "duplicate" if exc.code == "duplicate_update" else "rejected"
            return RoundOutcome(round_id, status, code=exc.code, message=str(exc), metrics=metrics)
        shutil.rmtree(folder, ignore_errors=True)
        return RoundOutcome(round_id, "evaluated", bytes_down=downloaded, metrics=metrics)

    def open_tasks(self, *, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """``GET rounds/``: the device's open training tasks.

        With ``wait_s`` > 0 the server holds the request until a task exists or the
        time is up (a long poll), so a device learns of a new round at once without
        hammering the server.
        """
        path = f"rounds/?wait={wait_s:g}" if wait_s > 0 else "rounds/"
        response = self.client.request("GET", path)
        tasks: list[dict[str, Any]] = response.json().get("tasks", [])
        return tasks


def register(handlers: MutableMapping[str, Callable[..., Any]], trainer: FederatedTrainer) -> None:
    """Install ``trainer`` as the agent's handler for ``train`` tasks."""
    handlers["train"] = trainer.run_task


def run_rounds(
    trainer: FederatedTrainer,
    *,
    stop: threading.Event,
    wait_s: float = 10.0,
    poll_s: float = 0.2,
    on_outcome: Callable[[RoundOutcome], None] | None = None,
) -> None:
    """Long-poll ``GET rounds/`` and run every task until ``stop`` is set (a simulated device).

    Each poll waits up to ``wait_s`` on the server; after an error the loop pauses
    ``poll_s`` and tries again, so a server restart or a 5xx never ends it. ``stop`` is
    seen within ``wait_s``.
    """
    done: set[int] = set()
    while not stop.is_set():
        try:
            tasks = trainer.open_tasks(wait_s=wait_s)
            for task in tasks:
                rid = int(task["round_id"])
                if rid in done:
                    continue
                outcome = trainer.run_task(task)
                done.add(rid)
                if on_outcome is not None:
                    on_outcome(outcome)
        except (ServerError, InterruptedError, OSError):
            stop.wait(poll_s)
