"""The device API client: full-jitter backoff, retry policy, typed errors (real loopback server)."""

from __future__ import annotations

import random
import socket
from collections.abc import Iterator

import pytest

from devices_agent.client import AgentClient, AuthError, Backoff, ServerError, retry_call
from tests.devices_agent.agent_helpers import Handler, ScriptedServer


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.close()


def test_full_jitter_delays_stay_within_the_exponential_ceiling() -> None:
    backoff = Backoff(base_s=1.0, cap_s=30.0, rng=random.Random(7))
    ceilings = []
    for attempt in range(12):
        ceiling = backoff.ceiling()
        ceilings.append(ceiling)
        assert ceiling == min(30.0, 2.0**attempt)
        delay = backoff.delay()
        assert 0.0 <= delay <= ceiling
    assert ceilings[-1] == 30.0
    backoff.reset()
    assert backoff.ceiling() == 1.0


def test_full_jitter_spreads_a_fleet_over_the_whole_window() -> None:
    # 1,000 clients failing at the same moment: their retries must not cluster (no
    # thundering herd): spread over [0, ceiling] close to uniformly.
    delays = []
    for seed in range(1000):
        b = Backoff(base_s=1.0, cap_s=60.0, rng=random.Random(seed), attempt=5)
        delays.append(b.delay())
    assert min(delays) < 1.0 and max(delays) > 31.0
    counts = [sum(1 for d in delays if k * 8 <= d < (k + 1) * 8) for k in range(4)]
    assert all(150 < c < 350 for c in counts), counts


def test_retry_call_retries_retryable_errors_then_succeeds() -> None:
    calls = {"n": 0}
    slept: list[float] = []

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ServerError("503", retryable=True, status=503)
        return "ok"

    backoff = Backoff(base_s=1.0, cap_s=10.0, rng=random.Random(1))
    assert retry_call(flaky, backoff=backoff, max_attempts=5, sleep=slept.append) == "ok"
    assert calls["n"] == 3 and len(slept) == 2
    assert 0 <= slept[0] <= 1.0 and 0 <= slept[1] <= 2.0
    assert backoff.attempt == 0  # reset after success


def test_retry_call_does_not_retry_permanent_errors() -> None:
    calls = {"n": 0}

    def refused() -> None:
        calls["n"] += 1
        raise ServerError("400", retryable=False, status=400)

    with pytest.raises(ServerError):
        retry_call(refused, backoff=Backoff(), max_attempts=5, sleep=lambda s: None)
    assert calls["n"] == 1


def test_retry_after_is_a_floor_under_the_jitter() -> None:
    slept: list[float] = []
    calls = {"n": 0}

    def limited() -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ServerError("429", retryable=True, status=429, retry_after_s=7.0)
        return "ok"

    retry_call(limited, backoff=Backoff(base_s=1.0, rng=random.Random(0)), max_attempts=3, sleep=slept.append)
    assert 7.0 <= slept[0] <= 8.0


def test_status_codes_map_to_typed_errors(server: ScriptedServer) -> None:
    def answer(status: int, headers: dict[str, str] | None = None):
        def route(h: Handler, body: bytes) -> None:
            h.send_json(status, {"error": {"code": f"c{status}", "message": "m", "details": None}}, headers)

        return route

    server.routes[("POST", "/api/agent/v1/heartbeat")] = answer(503)
    server.routes[("POST", "/api/agent/v1/metrics")] = answer(429, {"Retry-After": "3"})
    server.routes[("POST", "/api/agent/v1/enroll")] = answer(400)
    server.routes[("POST", "/api/agent/v1/commands/1/result")] = answer(401)
    client = AgentClient(server_url=server.url, secret="s3cret")
    with pytest.raises(ServerError) as exc:
        client.heartbeat({"seq": 1})
    assert exc.value.retryable and exc.value.status == 503 and exc.value.code == "c503"
    with pytest.raises(ServerError) as exc:
        client.send_metrics({"batch_id": "b", "samples": []})
    assert exc.value.retryable and exc.value.retry_after_s == 3.0
    with pytest.raises(ServerError) as exc:
        client.enroll({"token": "t", "name": "n", "hardware": {}})
    assert not exc.value.retryable
    with pytest.raises(AuthError):
        client.report_command(1, {"ok": True, "result": {}})
    _, _, headers, _ = server.requests[0]
    assert headers["Authorization"] == "Device s3cret"
    client.close()


def test_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = AgentClient(server_url=f"http://127.0.0.1:{port}", secret="x", timeout_s=2.0)
    with pytest.raises(ServerError) as exc:
        client.heartbeat({"seq": 1})
    assert exc.value.retryable and exc.value.status is None
    client.close()
