"""The application's client of the agent's local API: predictions, feedback, examples.

Standard library only, so an application can import it from the agent's package or copy
this one file next to its own code::

    from devices_agent.local_client import AgentClient

    agent = AgentClient("/var/lib/flotilla-agent/agent.sock")   # or "http://127.0.0.1:7071"
    p = agent.predict(window)             # one example of the family's input shape
    print(p["label"], p["score"])         # classification (regression: p["values"])
    agent.feedback(p["prediction_id"], 3) # the right answer, when the application learns it
    agent.add_samples(xs, ys)             # labelled examples the board may learn from

``predict`` takes one example (nested lists or anything with ``.tolist()``, e.g. a numpy
array) and returns a dict, or a batch (one more leading axis, ``batch=True``) and returns
a list. Errors raise :class:`LocalApiError` with the agent's code and message (for
example ``wrong_shape``, ``unknown_prediction``, ``no_model``).
"""

from __future__ import annotations

import array
import json
import socket
import sys
from itertools import chain
from typing import Any
from urllib.parse import urlparse

__all__ = ["AgentClient", "LocalApiError"]


class LocalApiError(RuntimeError):
    """The agent refused a request; ``code`` says why, ``status`` is the HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _plain(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


# numpy's little-endian spelling of each dtype the families take.
_DTYPES = {"float32": "<f4", "int64": "<i8", "uint8": "|u1"}


def _pack(inputs: Any) -> tuple[bytes, list[int], str] | None:
    """Inputs as raw little-endian bytes, their shape and dtype; None when they are not regular.

    Sending raw bytes spares both sides turning hundreds of floats into text and back,
    which would cost more than a small model's inference.
    """
    if hasattr(inputs, "tobytes") and hasattr(inputs, "dtype") and hasattr(inputs, "shape"):
        kind = str(inputs.dtype)
        dtype = kind if kind in _DTYPES else "float32"
        arr = inputs.astype(
            f"<{_DTYPES[dtype] if dtype != 'float32' else 'f4'}".replace("<q", "<i8").replace("<B", "u1")
        )
        return bytes(arr.tobytes()), [int(d) for d in inputs.shape], dtype
    shape: list[int] = []
    level = inputs
    while isinstance(level, list | tuple):
        shape.append(len(level))
        if not level:
            return None
        level = level[0]
    if not shape or not isinstance(level, int | float) or isinstance(level, bool):
        return None
    flat: Any = inputs
    for _ in range(len(shape) - 1):
        flat = list(chain.from_iterable(flat))
    expected = 1
    for d in shape:
        expected *= d
    if len(flat) != expected:
        return None  # ragged: let the agent say what is wrong
    try:
        packed = array.array("f", flat)
    except TypeError:
        return None
    if sys.byteorder != "little":
        packed.byteswap()
    return packed.tobytes(), shape, "float32"


class AgentClient:
    """A connection to the agent's local API (a Unix socket path, or an ``http://`` URL)."""

    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader: Any = None

    def _connect(self) -> None:
        if self.address.startswith("http://"):
            url = urlparse(self.address)
            sock = socket.create_connection(
                (url.hostname or "127.0.0.1", url.port or 80), timeout=self.timeout
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.address)
            except OSError:
                sock.close()
                raise
        self._sock = sock
        self._reader = sock.makefile("rb")

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        if self._reader is not None:
            self._reader.close()
        if self._sock is not None:
            self._sock.close()
        self._sock = self._reader = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _roundtrip(self, request: bytes) -> tuple[int, bytes]:
        if self._sock is None:
            self._connect()
        assert self._sock is not None
        self._sock.sendall(request)
        status_line = self._reader.readline(65537)
        if not status_line:
            raise ConnectionError("the agent closed the connection")
        status = int(status_line.split()[1])
        length = 0
        close = False
        while True:
            line = self._reader.readline(65537)
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            key = name.strip().lower()
            if key == "content-length":
                length = int(value)
            elif key == "connection" and value.strip().lower() == "close":
                close = True
        data = self._reader.read(length) if length else b""
        if close:
            self.close()
        return status, data

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: tuple[bytes, list[int], str, bool] | None = None,
    ) -> Any:
        if raw is not None:
            payload, shape, dtype, batch = raw
            dims = ",".join(str(d) for d in shape)
            headers = (
                "Content-Type: application/octet-stream\r\n"
                f"X-Shape: {dims}\r\nX-Dtype: {dtype}\r\nX-Batch: {1 if batch else 0}\r\n"
            )
        elif body is not None:
            payload = json.dumps(body, separators=(",", ":")).encode()
            headers = "Content-Type: application/json\r\n"
        else:
            payload, headers = b"", ""
        request = (
            f"{method} {path} HTTP/1.1\r\nHost: agent\r\n{headers}Content-Length: {len(payload)}\r\n\r\n"
        )
        message = request.encode("latin-1") + payload
        for attempt in (1, 2):
            try:
                status, data = self._roundtrip(message)
                break
            except (ConnectionError, OSError, ValueError, IndexError):
                # A kept-alive connection the agent closed (it restarted): reconnect once.
                self.close()
                if attempt == 2:
                    raise
        answer = json.loads(data) if data else {}
        if status >= 400:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise LocalApiError(status, str(error.get("code", "error")), str(error.get("message", "")))
        return answer

    def predict(self, inputs: Any, *, batch: bool = False) -> Any:
        """One prediction (a dict) for one example, or a list for a batch (``batch=True``).

        Each has ``prediction_id`` (for :meth:`feedback`), ``outputs``, and for
        classification ``label`` and ``score``, for regression ``values``; the answer also
        says which model answered (``version_id``, ``model``: ``global`` or ``personal``).
        """
        packed = _pack(inputs)
        if packed is not None:
            data, shape, dtype = packed
            answer = self._call("POST", "/v1/predict", raw=(data, shape, dtype, batch))
        else:
            answer = self._call("POST", "/v1/predict", {"inputs": _plain(inputs), "batch": batch})
        predictions = answer["predictions"]
        for p in predictions:
            p["version_id"] = answer.get("version_id")
            p["model"] = answer.get("model")
        return predictions if batch else predictions[0]

    def feedback(self, prediction_id: int, label: Any) -> dict[str, Any]:
        """Tell the agent the right answer of an earlier prediction; it keeps the example."""
        result: dict[str, Any] = self._call(
            "POST", "/v1/feedback", {"prediction_id": int(prediction_id), "label": _plain(label)}
        )
        return result

    def add_samples(self, x: Any, y: Any) -> dict[str, Any]:
        """Give the board labelled examples to learn from (``x``: a batch, ``y``: one label each)."""
        result: dict[str, Any] = self._call("POST", "/v1/samples", {"x": _plain(x), "y": _plain(y)})
        return result

    def status(self) -> dict[str, Any]:
        """The agent's model and its counts of local examples."""
        result: dict[str, Any] = self._call("GET", "/v1/status")
        return result
