"""HTTP client of the device API, with typed errors and retries with full jitter.

Every request carries ``Authorization: Device <secret>`` (except enrollment). Failures are
sorted into two errors the agent acts on:

* :class:`ServerError` with ``retryable=True`` for connection errors, timeouts, 5xx and
  429: try again later, with backoff;
* :class:`AuthError` (401/403): the credentials are gone (decommissioned device, revoked
  secret); retrying cannot help.

Other 4xx answers are :class:`ServerError` with ``retryable=False``.

Backoff uses *full jitter* (sleep = uniform(0, min(cap, base * 2**attempt))): after an
outage, a fleet whose requests all failed at once spreads its retries over the whole
window instead of coming back in lockstep, which is what keeps a recovering server from
being knocked over again by a thundering herd.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import httpx

from devices_agent import __version__
from devices_agent.wire import (
    API_PREFIX,
    AUTH_SCHEME,
    CommandResultRequest,
    DeploymentStatusRequest,
    DriftSketch,
    EnrollRequest,
    EnrollResponse,
    HeartbeatRequest,
    HeartbeatResponse,
    MetricsRequest,
    MetricsResponse,
)

__all__ = [
    "AgentClient",
    "make_http_client",
    "AuthError",
    "Backoff",
    "ClientError",
    "ServerError",
    "retry_call",
]

T = TypeVar("T")


class ClientError(Exception):
    """Base of the errors the device API client raises."""


class ServerError(ClientError):
    """A request failed; ``retryable`` says whether trying again later may succeed."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        code: str = "",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.code = code
        self.retry_after_s = retry_after_s


class AuthError(ClientError):
    """The server refused the device's credentials (401/403)."""

    def __init__(self, message: str, *, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Backoff:
    """Exponential backoff with full jitter: ``delay() = uniform(0, min(cap, base * 2**n))``.

    ``n`` counts the failures since the last :meth:`reset`. The random source is
    injectable so tests (and simulated fleets) are reproducible.
    """

    base_s: float = 1.0
    cap_s: float = 300.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def ceiling(self) -> float:
        """The upper bound of the next delay."""
        # 2**attempt overflows floats past ~1024 attempts; the cap is reached long before.
        return min(self.cap_s, self.base_s * (2.0 ** min(self.attempt, 60)))

    def delay(self) -> float:
        """The next delay in seconds; counts one more failure."""
        value = self.rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return value

    def reset(self) -> None:
        """Forget past failures (after a success)."""
        self.attempt = 0


def retry_call(
    fn: Callable[[], T],
    *,
    backoff: Backoff,
    max_attempts: int,
    sleep: Callable[[float], None] = time.sleep,
    should_stop: Callable[[], bool] | None = None,
) -> T:
    """Call ``fn`` until it succeeds, retrying retryable :class:`ServerError` with backoff.

    Non-retryable errors and :class:`AuthError` propagate at once; the last retryable
    error propagates after ``max_attempts`` calls. A server's ``Retry-After`` is honoured
    as a floor, with the jittered delay added on top so clients still spread out.
    """
    for attempt in range(1, max_attempts + 1):
        try:
            value = fn()
        except ServerError as exc:
            if not exc.retryable or attempt == max_attempts or (should_stop and should_stop()):
                raise
            pause = backoff.delay()
            if exc.retry_after_s is not None:
                pause += exc.retry_after_s
            sleep(pause)
            continue
        backoff.reset()
        return value
    raise AssertionError("unreachable")  # pragma: no cover


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _error_of(response: httpx.Response) -> tuple[str, str]:
    """The code and message of the server's one error shape, or the raw text."""
    try:
        body = response.json()
        error = body.get("error", {}) if isinstance(body, dict) else {}
        return str(error.get("code", "")), str(error.get("message", "")) or response.text[:300]
    except (ValueError, json.JSONDecodeError):
        return "", response.text[:300]


def raise_for_response(response: httpx.Response) -> None:
    """Turn a non-2xx response into :class:`AuthError` or :class:`ServerError`."""
    status = response.status_code
    if status < 400:
        return
    code, message = _error_of(response)
    text = f"{response.request.method} {response.request.url.path} -> {status}: {message}"
    if status in (401, 403):
        raise AuthError(text, status=status)
    retryable = status >= 500 or status in (408, 429)
    raise ServerError(
        text, retryable=retryable, status=status, code=code, retry_after_s=_retry_after(response)
    )


@dataclass
class WireCounter:
    """Bytes sent and received on the wire (request line, headers and bodies), for benchmarks."""

    sent: int = 0
    received: int = 0
    requests: int = 0
    received_body: int = 0

    def add(self, response: httpx.Response) -> None:
        request = response.request
        line = f"{request.method} {request.url.raw_path.decode()} HTTP/1.1\r\n"
        headers = sum(len(k) + len(v) + 4 for k, v in request.headers.raw)
        self.sent += len(line) + headers + 2 + len(request.content)
        status_line = f"HTTP/1.1 {response.status_code} {response.reason_phrase}\r\n"
        r_headers = sum(len(k) + len(v) + 4 for k, v in response.headers.raw)
        self.received += len(status_line) + r_headers + 2 + len(response.content)
        self.received_body += len(response.content)
        self.requests += 1


def make_http_client(*, timeout_s: float = 15.0, **kwargs: Any) -> httpx.Client:
    """An httpx client with the agent's timeouts and lean default headers.

    httpx sends ``Accept``, ``Accept-Encoding: gzip, deflate, br, zstd`` and ``Connection``
    by default; on a heartbeat every 60 s those are some 80 bytes a minute that say
    nothing (HTTP/1.1 keeps connections alive anyway), so only a short user agent and
    ``Accept-Encoding: gzip`` remain.
    """
    client = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)), **kwargs)
    for name in ("Accept", "Connection"):
        client.headers.pop(name, None)
    client.headers["Accept-Encoding"] = "gzip"
    client.headers["User-Agent"] = f"flotilla-agent/{__version__}"
    return client


class AgentClient:
    """The device API over httpx. One instance per device; ``http`` may be shared."""

    def __init__(
        self,
        *,
        server_url: str,
        secret: str | None = None,
        timeout_s: float = 15.0,
        http: httpx.Client | None = None,
        counter: WireCounter | None = None,
        verify: Any = True,
    ) -> None:
        """``verify``: how to trust the server over HTTPS when this client makes its own pool
        (``AgentConfig.tls_verify``: the system's CAs, a CA file or a pinned certificate)."""
        self.server_url = server_url.rstrip("/")
        self.secret = secret
        self.counter = counter
        self._owns_http = http is None
        self.http = http or make_http_client(timeout_s=timeout_s, verify=verify)

    def close(self) -> None:
        """Close the connection pool if this client created it."""
        if self._owns_http:
            self.http.close()

    def url(self, path: str) -> str:
        """An absolute URL for a device API path (``heartbeat``) or a server path (``/api/...``)."""
        if path.startswith(("http://", "https://")):
            return path
        if path.startswith("/"):
            return f"{self.server_url}{path}"
        return f"{self.server_url}{API_PREFIX}{path}"

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.secret:
            headers["Authorization"] = f"{AUTH_SCHEME} {self.secret}"
        if extra:
            headers.update(extra)
        return headers

    def request(
        self, method: str, path: str, *, json_body: Any = None, headers: Mapping[str, str] | None = None
    ) -> httpx.Response:
        """Send one request; connection failures become retryable :class:`ServerError`."""
        try:
            response = self.http.request(
                method, self.url(path), json=json_body, headers=self._headers(headers)
            )
        except httpx.TransportError as exc:
            raise ServerError(f"{method} {path}: {type(exc).__name__}: {exc}", retryable=True) from exc
        if self.counter is not None:
            self.counter.add(response)
        raise_for_response(response)
        return response

    def _json(self, method: str, path: str, body: Any) -> dict[str, Any]:
        response = self.request(method, path, json_body=body)
        try:
            data = response.json()
        except ValueError as exc:
            raise ServerError(f"{method} {path}: response is not JSON", retryable=True) from exc
        if not isinstance(data, dict):
            raise ServerError(f"{method} {path}: response is not a JSON object", retryable=False)
        return data

    # --- the endpoints ---------------------------------------------------------------
    def enroll(self, body: EnrollRequest) -> EnrollResponse:
        """``POST enroll`` with a one-time token."""
        return cast(EnrollResponse, self._json("POST", "enroll", body))

    def heartbeat(self, body: HeartbeatRequest) -> HeartbeatResponse:
        """``POST heartbeat``: status in, desired state out."""
        return cast(HeartbeatResponse, self._json("POST", "heartbeat", body))

    def send_metrics(self, body: MetricsRequest) -> MetricsResponse:
        """``POST metrics``: one batch, idempotent by ``batch_id``."""
        return cast(MetricsResponse, self._json("POST", "metrics", body))

    def send_drift(self, body: DriftSketch) -> dict[str, Any]:
        """``POST drift``: one window's input/confidence sketch."""
        return self._json("POST", "drift", body)

    def report_deployment(self, deployment_id: int, body: DeploymentStatusRequest) -> dict[str, Any]:
        """``POST deployments/<id>/status``."""
        return self._json("POST", f"deployments/{int(deployment_id)}/status", body)

    def report_command(self, command_id: int, body: CommandResultRequest) -> dict[str, Any]:
        """``POST commands/<id>/result``."""
        return self._json("POST", f"commands/{int(command_id)}/result", body)

    @contextmanager
    def stream(self, path: str, *, headers: Mapping[str, str] | None = None) -> Iterator[httpx.Response]:
        """``GET`` a (large) resource as a stream; errors as in :meth:`request`."""
        try:
            with self.http.stream("GET", self.url(path), headers=self._headers(headers)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise_for_response(response)
                yield response
        except httpx.TransportError as exc:
            raise ServerError(f"GET {path}: {type(exc).__name__}: {exc}", retryable=True) from exc
