"""The agent's local API: the application on the board asks for predictions and teaches it.

``POST /v1/predict`` ``{"inputs": <one example or a batch>, "batch": bool}``: the active
model's answer (the board's personal model when it beats the global one on the local
holdout), with a ``prediction_id`` per example; latency and confidence become metrics
and the inputs feed the drift sketch. ``POST /v1/feedback`` ``{"prediction_id", "label"}``:
the right answer of an earlier prediction, recorded as ``correct`` (or ``abs_error``)
and kept, with its input, as a labelled example. ``POST /v1/samples`` ``{"x", "y"}``:
labelled examples. ``GET /v1/status``: the model and the counts of local examples.

Served over HTTP/1.1 on a Unix domain socket (default; the file's mode and group say who
may call: connecting needs write permission on it), optionally also on a loopback TCP
port. Requests are checked against the family's input contract
(:class:`devices_agent.family.FamilySpec`) before the model sees them; errors are JSON
``{"error": {"code", "message"}}`` with a 4xx status. :class:`LocalService` is the logic
without the transport, which the simulator's generated applications call in-process.
"""

from __future__ import annotations

import collections
import grp
import itertools
import json
import logging
import os
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from devices_agent.drift import DriftSketch, drift_features
from devices_agent.family import FamilySpec, SpecError, feedback_metric, probabilities
from devices_agent.samples import SampleStore
from devices_agent.shadow import ShadowRunner

__all__ = ["ActiveModel", "LocalApiError", "LocalApiServer", "LocalService"]

log = logging.getLogger("devices_agent.local_api")

Recorder = Callable[[str, float, int | None], None]


class LocalApiError(Exception):
    """A refused local request: HTTP ``status``, a stable ``code`` and a message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class ActiveModel:
    """The model that answers predictions now: an ONNX Runtime session and its contract."""

    version_id: int
    spec: FamilySpec
    session: Any
    kind: str = "global"  # or "personal": the board's own head on the global body
    extra_delay_ms: float = 0.0

    def __post_init__(self) -> None:
        self.input_name = self.session.get_inputs()[0].name

    def run(self, batch: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        outputs = self.session.run(None, {self.input_name: batch})[0]
        if self.extra_delay_ms:
            time.sleep(self.extra_delay_ms / 1000.0)
        return np.asarray(outputs, dtype=np.float64).reshape(len(batch), -1)


@dataclass
class _Open:
    version_id: int
    x: npt.NDArray[Any]
    output: npt.NDArray[np.float64]


class LocalService:
    """The local API's logic: predict, feedback, add_samples, status (see the module docstring)."""

    def __init__(
        self,
        *,
        model: Callable[[], ActiveModel | None],
        store: SampleStore,
        record: Recorder,
        status: Callable[[], dict[str, Any]] | None = None,
        on_examples: Callable[[], None] | None = None,
        max_batch: int = 1024,
        max_open: int = 10_000,
        max_open_bytes: int = 64 * 1024 * 1024,
        shadow: ShadowRunner | None = None,
    ) -> None:
        self.model = model
        # A candidate version run beside the active one (devices_agent.shadow); it sees
        # the same inputs after the answer is built and never changes it.
        self.shadow = shadow
        self.store = store
        self.record = record
        self.extra_status = status
        self.on_examples = on_examples
        self.max_batch = max_batch
        self.max_open = max_open
        self.max_open_bytes = max_open_bytes
        self._ids = itertools.count(int(time.time() * 1000) % 10**12)
        self._open: collections.OrderedDict[int, _Open] = collections.OrderedDict()
        self._open_bytes = 0
        self._lock = threading.Lock()
        self.drift: DriftSketch | None = None
        # The reference's bins the server answered a sketch with (wire.DriftFeatureBins).
        self.drift_bins: dict[str, Any] | None = None
        self.drift_lock = threading.Lock()
        self._pending: list[tuple[tuple[int, ...], npt.NDArray[Any], list[float]]] = []
        self._pending_rows = 0

    # --- predict ---------------------------------------------------------------------
    def predict(self, inputs: Any, *, batch: bool = False) -> dict[str, Any]:
        """Run the active model on one example or a batch (see the module docstring)."""
        active = self.model()
        if active is None:
            raise LocalApiError(503, "no_model", "no model is installed on this board yet")
        spec = active.spec
        try:
            x = spec.inputs(inputs, max_batch=self.max_batch)
        except SpecError as exc:
            raise LocalApiError(
                413 if exc.code == "batch_too_large" else 400, exc.code, exc.message
            ) from None
        if not batch and len(x) != 1:
            raise LocalApiError(
                400, "wrong_shape", f"one example of shape {list(spec.input_shape)} expected (or set batch)"
            )
        started = time.perf_counter()
        try:
            outputs = active.run(x)
        except Exception as exc:  # noqa: BLE001 - the runtime's errors; the app gets a clean 500-free answer
            self.record("error", 1.0, active.version_id)
            raise LocalApiError(
                422, "inference_failed", f"the model could not run this input: {exc}"
            ) from None
        latency_ms = (time.perf_counter() - started) * 1000.0
        self.record("latency_ms", latency_ms, active.version_id)
        predictions: list[dict[str, Any]] = []
        confidences: list[float] = []
        if spec.task == "classification":
            probs = probabilities(outputs)
            for i in range(len(x)):
                label = int(probs[i].argmax())
                score = float(probs[i, label])
                confidences.append(score)
                predictions.append(
                    {
                        "prediction_id": self._remember(active, x[i], outputs[i]),
                        "label": label,
                        "score": score,
                        "outputs": [float(v) for v in outputs[i]],
                    }
                )
                self.record("confidence", score, active.version_id)
        else:
            for i in range(len(x)):
                values = [float(v) for v in outputs[i]]
                predictions.append(
                    {
                        "prediction_id": self._remember(active, x[i], outputs[i]),
                        "values": values,
                        "outputs": values,
                    }
                )
        self._sketch(spec, x, confidences)
        answer = {"version_id": active.version_id, "model": active.kind, "predictions": predictions}
        if self.shadow is not None:
            try:
                self.shadow.offer(
                    ids=[int(p["prediction_id"]) for p in predictions], x=x, active_outputs=outputs, spec=spec
                )
            except Exception:  # noqa: BLE001 - shadow work never costs the application its answer
                log.exception("shadow offer failed")
        return answer

    def predict_raw(self, body: bytes, *, shape: str, dtype: str, batch: bool) -> dict[str, Any]:
        """:meth:`predict` for inputs sent as raw little-endian bytes of ``shape`` and ``dtype``.

        What the client sends for arrays: no float parsing on either side, which for a
        window of a few hundred values costs more than the inference.
        """
        if dtype not in ("float32", "int64", "uint8"):
            raise LocalApiError(400, "malformed", f"unsupported dtype {dtype!r}")
        try:
            dims = tuple(int(d) for d in shape.split(",")) if shape else ()
        except ValueError:
            raise LocalApiError(400, "malformed", f"X-Shape must be integers: {shape!r}") from None
        if (
            not dims
            or any(d < 1 for d in dims)
            or np.prod(dims, dtype=np.int64) * np.dtype(dtype).itemsize != len(body)
        ):
            raise LocalApiError(
                400, "wrong_shape", f"{len(body)} bytes do not hold a {dtype} array of shape {list(dims)}"
            )
        return self.predict(
            np.frombuffer(body, dtype=np.dtype(dtype).newbyteorder("<")).reshape(dims), batch=batch
        )

    def _remember(self, active: ActiveModel, x: npt.NDArray[Any], output: npt.NDArray[np.float64]) -> int:
        prediction_id = next(self._ids)
        entry = _Open(
            version_id=active.version_id, x=np.array(x, copy=True), output=np.array(output, copy=True)
        )
        with self._lock:
            self._open[prediction_id] = entry
            self._open_bytes += entry.x.nbytes + entry.output.nbytes
            # Bounded: unlabelled traffic forgets its oldest predictions, it never grows memory.
            while self._open and (len(self._open) > self.max_open or self._open_bytes > self.max_open_bytes):
                _, old = self._open.popitem(last=False)
                self._open_bytes -= old.x.nbytes + old.output.nbytes
        return prediction_id

    def _sketch(self, spec: FamilySpec, x: npt.NDArray[Any], confidences: list[float]) -> None:
        # Inputs are folded into the sketch in batches: one row at a time would cost more
        # than the inference of a small model.
        with self.drift_lock:
            self._pending.append((spec.input_shape, x, confidences))
            self._pending_rows += len(x)
            if self._pending_rows >= 256:
                self._fold()

    def _fold(self) -> None:
        if not self._pending:
            return
        shape = self._pending[-1][0]
        rows = [x for s, x, _ in self._pending if s == shape]
        conf = [c for s, _, cs in self._pending if s == shape for c in cs]
        self._pending.clear()
        self._pending_rows = 0
        features = drift_features(np.concatenate(rows), shape)
        if self.drift is None or self.drift.num_features != features.shape[1]:
            self.drift = DriftSketch(num_features=features.shape[1], feature_bins=self.drift_bins)
        self.drift.update(inputs=features, confidence=conf)

    def set_drift_bins(self, bins: dict[str, Any] | None) -> None:
        """Count per-feature values over these reference bins from now on (the server's answer)."""
        with self.drift_lock:
            self._fold()
            self.drift_bins = bins
            if self.drift is not None:
                self.drift.set_feature_bins(bins)

    def take_drift(self) -> dict[str, Any] | None:
        """The drift sketch of the inputs seen since the last call, and a fresh window."""
        with self.drift_lock:
            self._fold()
            return None if self.drift is None else self.drift.take()

    # --- feedback and examples ---------------------------------------------------------
    def feedback(self, prediction_id: Any, label: Any) -> dict[str, Any]:
        """Record whether an earlier prediction was right and keep its input as an example."""
        if isinstance(prediction_id, bool) or not isinstance(prediction_id, int):
            raise LocalApiError(400, "invalid_prediction_id", "prediction_id must be an integer")
        active = self.model()
        with self._lock:
            entry = self._open.get(prediction_id)
        if entry is None:
            raise LocalApiError(
                404,
                "unknown_prediction",
                f"no open prediction {prediction_id} (unknown, answered, or too old)",
            )
        spec = active.spec if active is not None else None
        if spec is None:
            raise LocalApiError(503, "no_model", "no model is installed on this board")
        try:
            name, value = feedback_metric(spec, entry.output, label)
            y = spec.labels([label] if spec.task == "classification" else label, count=1)
        except SpecError as exc:
            raise LocalApiError(400, exc.code, exc.message) from None
        self._store(entry.x.reshape(1, *spec.input_shape), y)
        with self._lock:
            if self._open.pop(prediction_id, None) is not None:
                self._open_bytes -= entry.x.nbytes + entry.output.nbytes
        self.record(name, value, entry.version_id)
        if self.shadow is not None:
            self.shadow.feedback(prediction_id, label)
        return {"recorded": name, "value": value, **self.counts()}

    def add_samples(self, x: Any, y: Any) -> dict[str, Any]:
        """Keep labelled examples for training and the local holdout."""
        active = self.model()
        if active is None:
            raise LocalApiError(
                503, "no_model", "no model is installed yet, so the input contract is unknown"
            )
        spec = active.spec
        try:
            xs = spec.inputs(x, max_batch=self.max_batch)
            ys = spec.labels(y, count=len(xs))
        except SpecError as exc:
            raise LocalApiError(
                413 if exc.code == "batch_too_large" else 400, exc.code, exc.message
            ) from None
        self._store(xs, ys)
        return {"added": len(xs), **self.counts()}

    def _store(self, x: npt.NDArray[Any], y: npt.NDArray[Any]) -> None:
        try:
            self.store.add(x, y)
        except ValueError as exc:
            raise LocalApiError(413, "too_large", str(exc)) from None
        evicted = self.store.take_evicted()
        if evicted:
            self.record("samples_evicted", float(evicted), None)
        if self.on_examples is not None:
            self.on_examples()

    def counts(self) -> dict[str, int]:
        """The board's example counts (what the agent reports; the examples never leave)."""
        c = self.store.counts()
        return {"examples": c.examples, "training_examples": c.training, "holdout_examples": c.holdout}

    def status(self) -> dict[str, Any]:
        """The active model and the example counts."""
        active = self.model()
        out: dict[str, Any] = {
            "version_id": active.version_id if active else None,
            "model": active.kind if active else None,
            "family": active.spec.to_dict() if active else None,
            **self.counts(),
        }
        if self.extra_status is not None:
            out.update(self.extra_status())
        return out


# --- transport ---------------------------------------------------------------------------


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Too Large",
    422: "Unprocessable",
    500: "Internal Error",
    503: "Unavailable",
}
_MAX_HEADER_LINE = 8192
_MAX_HEADERS = 64


class _Handler(socketserver.StreamRequestHandler):
    """A small HTTP/1.1 server loop: keep-alive, Content-Length bodies, JSON or raw tensors.

    ``http.server`` parses headers with the e-mail parser, which costs more than a small
    model's whole inference; a prediction's overhead is what applications feel, so the
    few headers this API uses are read directly.
    """

    service: LocalService
    max_body: int

    def handle(self) -> None:
        while True:
            try:
                request = self._read_request()
            except (ConnectionError, TimeoutError, OSError):
                return
            if request is None:
                return
            method, path, headers, body, keep_alive = request
            status, answer = self._dispatch(method, path, headers, body)
            data = json.dumps(answer, separators=(",", ":")).encode()
            head = (
                f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                + ("" if keep_alive else "Connection: close\r\n")
                + "\r\n"
            )
            try:
                self.wfile.write(head.encode() + data)
                self.wfile.flush()
            except (ConnectionError, OSError):
                return
            if not keep_alive:
                return

    def _read_request(self) -> tuple[str, str, dict[str, str], bytes, bool] | None:
        line = self.rfile.readline(_MAX_HEADER_LINE + 1)
        if not line:
            return None
        parts = line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._reply_error(400, "malformed", "not an HTTP request")
            return None
        method, path, version = parts
        headers: dict[str, str] = {}
        for _ in range(_MAX_HEADERS + 1):
            raw = self.rfile.readline(_MAX_HEADER_LINE + 1)
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        else:
            self._reply_error(400, "malformed", "too many headers")
            return None
        try:
            length = int(headers.get("content-length") or 0)
        except ValueError:
            self._reply_error(400, "malformed", "Content-Length is not a number")
            return None
        if length < 0 or length > self.max_body:
            # The body is never read: the connection closes after the answer.
            self._reply_error(413, "too_large", f"the body is larger than {self.max_body} bytes")
            return None
        body = self.rfile.read(length) if length else b""
        if len(body) != length:
            return None
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return method, path, headers, body, keep_alive

    def _reply_error(self, status: int, code: str, message: str) -> None:
        data = json.dumps({"error": {"code": code, "message": message}}).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n"
        )
        try:
            self.wfile.write(head.encode() + data)
            self.wfile.flush()
        except (ConnectionError, OSError):
            pass

    def _dispatch(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any]]:
        path = path.split("?", 1)[0].rstrip("/")
        try:
            if method == "GET" and path == "/v1/status":
                return 200, self.service.status()
            if method != "POST":
                raise LocalApiError(405, "method_not_allowed", f"{method} {path} is not an endpoint")
            if path == "/v1/predict" and headers.get("content-type", "").startswith(
                "application/octet-stream"
            ):
                return 200, self.service.predict_raw(
                    body,
                    shape=headers.get("x-shape", ""),
                    dtype=headers.get("x-dtype", "float32"),
                    batch=headers.get("x-batch", "0") == "1",
                )
            payload = _json(body)
            if path == "/v1/predict":
                if "inputs" not in payload:
                    raise LocalApiError(400, "malformed", "inputs is required")
                return 200, self.service.predict(payload["inputs"], batch=bool(payload.get("batch", False)))
            if path == "/v1/feedback":
                if "prediction_id" not in payload or "label" not in payload:
                    raise LocalApiError(400, "malformed", "prediction_id and label are required")
                return 200, self.service.feedback(payload["prediction_id"], payload["label"])
            if path == "/v1/samples":
                if "x" not in payload or "y" not in payload:
                    raise LocalApiError(400, "malformed", "x and y are required")
                return 200, self.service.add_samples(payload["x"], payload["y"])
            raise LocalApiError(404, "not_found", f"no endpoint {path}")
        except LocalApiError as exc:
            return exc.status, {"error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:  # noqa: BLE001 - never leave the application without an answer
            log.exception("local api request failed")
            return 500, {"error": {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}}


def _json(body: bytes) -> dict[str, Any]:
    try:
        payload = json.loads(body) if body else {}
    except (ValueError, RecursionError):
        raise LocalApiError(400, "malformed_json", "the body is not JSON") from None
    if not isinstance(payload, dict):
        raise LocalApiError(400, "malformed_json", "the body must be a JSON object")
    return payload


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TcpServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True


class LocalApiServer:
    """Serves a :class:`LocalService` on a Unix socket (and optionally loopback TCP) in threads."""

    def __init__(
        self,
        service: LocalService,
        *,
        socket_path: Path | str | None,
        mode: int = 0o660,
        group: str | None = None,
        http: str | None = None,
        max_body: int = 16 * 1024 * 1024,
    ) -> None:
        handler = type("Handler", (_Handler,), {"service": service, "max_body": max_body})
        self.servers: list[socketserver.BaseServer] = []
        self.socket_path = Path(socket_path) if socket_path else None
        if self.socket_path is not None:
            self.socket_path.parent.mkdir(parents=True, exist_ok=True)
            if self.socket_path.exists() or self.socket_path.is_symlink():
                self.socket_path.unlink()  # a socket left by an agent that died
            unix = _UnixServer(str(self.socket_path), handler)
            # Permissions are the access control: who may write to the socket may call it.
            os.chmod(self.socket_path, mode)
            if group:
                os.chown(self.socket_path, -1, grp.getgrnam(group).gr_gid)
            self.servers.append(unix)
        self.http_address: tuple[str, int] | None = None
        if http:
            host, _, port = http.rpartition(":")
            host = host or "127.0.0.1"
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise ValueError("the local API listens on loopback only (127.0.0.1 or ::1)")
            tcp = _TcpServer((host, int(port)), handler)
            self.http_address = (host, int(tcp.server_address[1]))
            self.servers.append(tcp)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Serve in daemon threads."""
        for server in self.servers:
            thread = threading.Thread(target=server.serve_forever, name="agent-local-api", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop serving and remove the socket file."""
        for server in self.servers:
            server.shutdown()
            server.server_close()
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)
