"""The edge of the live server (uvicorn, the ASGI application): credentials before bodies,
slow clients, the long poll.

Raw sockets stand in for hostile or broken clients: they send headers and then stall, or
send half a request line and hold the connection open.
"""

from __future__ import annotations

import socket
import threading
import time
from datetime import timedelta
from typing import Any
from urllib.parse import urlparse

import httpx
import pytest

pytestmark = pytest.mark.slow


def _address(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "127.0.0.1", parsed.port or 80


def _enrolled(url: str) -> dict[str, str]:
    from django.utils import timezone

    from fleet.services.enrollment import enrollment_token_create

    _, token = enrollment_token_create(actor=None, max_uses=1, expires_at=timezone.now() + timedelta(hours=1))
    answer = httpx.post(f"{url}/api/agent/v1/enroll", json={"token": token, "name": "edge", "hardware": {}})
    assert answer.status_code == 200, answer.text
    return {"Authorization": f"Device {answer.json()['secret']}"}


def _stalled_request(
    url: str, *, authorization: str, length: int, path: str = "/api/agent/v1/heartbeat"
) -> bytes:
    """Send headers announcing ``length`` body bytes, one byte of body, then wait for the answer."""
    host, port = _address(url)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {authorization}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n{{"
            ).encode()
        )
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            pass
        return received


def test_bad_credentials_are_refused_before_the_body_is_read(live_stack: Any, transactional_db: Any) -> None:
    # 50 MB announced, one byte sent: a server that read the body first would wait for the
    # rest until the socket's timeout and answer nothing.
    refused = _stalled_request(live_stack.url, authorization="Device not-a-secret", length=50_000_000)
    assert refused.startswith(b"HTTP/1.1 401"), refused[:200]
    assert b"www-authenticate: device" in refused.lower()
    # Also without any credentials, and on the training paths.
    assert _stalled_request(
        live_stack.url, authorization="Basic eDp5", length=10_000_000, path="/api/agent/v1/rounds/1/update"
    ).startswith(b"HTTP/1.1 401")
    # A real device announcing a JSON body over the limit is told so before it sends it.
    auth = _enrolled(live_stack.url)
    too_large = _stalled_request(live_stack.url, authorization=auth["Authorization"], length=50_000_000)
    assert too_large.startswith(b"HTTP/1.1 413"), too_large[:200]


def test_heartbeats_keep_being_answered_while_slow_clients_hold_connections(
    live_stack: Any, transactional_db: Any
) -> None:
    host, port = _address(live_stack.url)
    auth = _enrolled(live_stack.url)
    slow: list[socket.socket] = []
    stop = threading.Event()

    def trickle() -> None:
        # Slowloris: a byte of header every second on every socket, never finishing.
        while not stop.wait(1.0):
            for sock in slow:
                try:
                    sock.sendall(b"a")
                except OSError:
                    pass

    try:
        for i in range(16):
            sock = socket.create_connection((host, port), timeout=10)
            if i % 2:
                sock.sendall(f"POST /api/agent/v1/heartbeat HTTP/1.1\r\nHost: {host}\r\nX-Slow: ".encode())
            else:  # complete headers with good credentials, a body that never ends
                sock.sendall(
                    (
                        f"POST /api/agent/v1/metrics HTTP/1.1\r\nHost: {host}\r\n"
                        f"Authorization: {auth['Authorization']}\r\nContent-Type: application/json\r\n"
                        "Content-Length: 900000\r\n\r\n{"
                    ).encode()
                )
            slow.append(sock)
        threading.Thread(target=trickle, daemon=True).start()
        with httpx.Client(base_url=live_stack.url, timeout=10) as http:
            for seq in range(1, 21):
                beat = http.post("/api/agent/v1/heartbeat", json={"seq": seq, "state": {}}, headers=auth)
                assert beat.status_code == 200, beat.text
            # The long poll, an async view, answers at its timeout with nothing to do.
            started = time.monotonic()
            polled = http.get("/api/agent/v1/rounds/", params={"wait": "1"}, headers=auth)
            assert polled.status_code == 200 and polled.json() == {"tasks": []}
            assert time.monotonic() - started >= 0.9
    finally:
        stop.set()
        for sock in slow:
            sock.close()
