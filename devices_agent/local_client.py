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

import http.client
import json
import socket
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


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _plain(value: Any) -> Any:
    tolist = getattr(value, "tolist", None)
    return tolist() if callable(tolist) else value


class AgentClient:
    """A connection to the agent's local API (a Unix socket path, or an ``http://`` URL)."""

    def __init__(self, address: str, *, timeout: float = 30.0) -> None:
        self.address = address
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.address.startswith("http://"):
                url = urlparse(self.address)
                self._conn = http.client.HTTPConnection(
                    url.hostname or "127.0.0.1", url.port, timeout=self.timeout
                )
            else:
                self._conn = _UnixConnection(self.address, self.timeout)
        return self._conn

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        payload = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        for attempt in (1, 2):
            conn = self._connection()
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError):
                # A kept-alive connection the agent closed (it restarted): reconnect once.
                self.close()
                if attempt == 2:
                    raise
        answer = json.loads(data) if data else {}
        if response.status >= 400:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise LocalApiError(
                response.status, str(error.get("code", "error")), str(error.get("message", ""))
            )
        return answer

    def predict(self, inputs: Any, *, batch: bool = False) -> Any:
        """One prediction (a dict) for one example, or a list for a batch (``batch=True``).

        Each has ``prediction_id`` (for :meth:`feedback`), ``outputs``, and for
        classification ``label`` and ``score``, for regression ``values``; the answer also
        says which model answered (``version_id``, ``model``: ``global`` or ``personal``).
        """
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
