"""Webhooks cannot reach inside: addresses, redirects, slow and huge answers, who sees errors."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fleet.models import WebhookDelivery, WebhookEndpoint
from fleet.outbound import AddressRefused, resolve_target, url_refusal
from fleet.services.webhooks import webhook_deliver
from tests.fleet.rollouts.test_webhooks import SECRET, Receiver


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:6379/",
        "http://127.1/",
        "http://localhost:8000/hook",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.5/hook",
        "http://192.168.1.10/hook",
        "http://172.18.0.3:5432/",
        "http://100.64.0.1/",
        "http://0.0.0.0/",
        "http://224.0.0.1/",
        "http://redis:6379/",
        "http://web/hook",
        "http://db.internal/hook",
        "http://printer.local/hook",
        "ftp://hooks.example.com/",
        "file:///etc/passwd",
        "http://user:pw@hooks.example.com/",
        "http:///nohost",
    ],
)
def test_internal_and_odd_urls_are_refused(url: str, settings: Any) -> None:
    settings.WEBHOOK_ALLOWED_HOSTS = []
    assert url_refusal(url) is not None
    with pytest.raises(AddressRefused):
        resolve_target(url)


@pytest.mark.parametrize("url", ["https://hooks.example.com/flotilla", "http://8.8.8.8:8080/x?y=1"])
def test_public_urls_pass_the_first_check(url: str, settings: Any) -> None:
    settings.WEBHOOK_ALLOWED_HOSTS = []
    assert url_refusal(url) is None


def test_the_allow_list_admits_trusted_internal_receivers(settings: Any) -> None:
    settings.WEBHOOK_ALLOWED_HOSTS = ["receiver", "10.20.0.0/16"]
    assert url_refusal("http://receiver:9000/hook") is None
    assert url_refusal("http://10.20.3.4/hook") is None
    assert url_refusal("http://10.21.3.4/hook") is not None
    target = resolve_target("http://10.20.3.4:81/hook?x=1")
    assert target.url == "http://10.20.3.4:81/hook?x=1" and target.host_header == "10.20.3.4:81"


def test_a_name_is_checked_again_when_connecting(settings: Any, monkeypatch: Any) -> None:
    """A public-looking name that resolves to loopback (DNS rebinding) is refused at connect."""
    settings.WEBHOOK_ALLOWED_HOSTS = []
    real = socket.getaddrinfo

    def resolver(host: str, *args: Any, **kwargs: Any) -> Any:
        # The resolver is the outside world here: a name whose record points inside.
        if host == "hooks.example.com":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    assert url_refusal("http://hooks.example.com/x") is None
    with pytest.raises(AddressRefused, match="resolves to 127.0.0.1"):
        resolve_target("http://hooks.example.com/x")


def test_the_api_refuses_an_internal_url_and_stores_nothing(operator_client: Any, settings: Any) -> None:
    settings.WEBHOOK_ALLOWED_HOSTS = []
    for url in ("http://127.0.0.1:5432/", "http://redis:6379/", "http://169.254.169.254/", "http://a.local/"):
        response = operator_client.post(
            "/api/v1/webhooks/",
            {"name": "inside", "url": url, "secret": SECRET, "event_types": []},
            format="json",
        )
        assert response.status_code == 400, response.content
        assert "url" in response.json()["error"]["details"]
    assert not WebhookEndpoint.objects.exists()
    response = operator_client.post(
        "/api/v1/webhooks/",
        {"name": "inside", "url": "http://10.1.2.3/hook", "secret": SECRET, "event_types": []},
        format="json",
    )
    assert "cannot be sent there: 10.1.2.3 is not a public address" in str(response.json())


def test_a_delivery_to_a_refused_address_sends_nothing(db: Any, settings: Any) -> None:
    receiver = Receiver()
    try:
        endpoint = WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET, event_types=[])
        delivery = WebhookDelivery.objects.create(
            endpoint=endpoint, event_type="ping", payload={}, max_attempts=1, next_attempt_at=_now()
        )
        settings.WEBHOOK_ALLOWED_HOSTS = []  # saved while allowed, refused when sent
        sent = webhook_deliver(delivery_id=delivery.pk)
        assert sent is not None and sent.status == "failed" and "address refused" in sent.last_error
        assert receiver.requests == []
    finally:
        receiver.close()


class Hostile:
    """A loopback receiver that redirects, answers too much, or answers too slowly."""

    def __init__(self, mode: str, target: str = "") -> None:
        self.mode = mode
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                if hostile.mode == "redirect":
                    self.send_response(307)
                    self.send_header("Location", target)
                    self.end_headers()
                elif hostile.mode == "huge":
                    self.send_response(200)
                    self.end_headers()
                    try:
                        for _ in range(200):
                            self.wfile.write(b"x" * 65536)
                    except OSError:
                        pass
                else:  # drip: a byte at a time, never finishing within the deadline
                    self.send_response(200)
                    self.send_header("Content-Length", "100")
                    self.end_headers()
                    try:
                        for _ in range(100):
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            time.sleep(0.2)
                    except OSError:
                        pass

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _now() -> Any:
    from django.utils import timezone

    return timezone.now()


@pytest.fixture
def inner() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _deliver_to(url: str) -> WebhookDelivery:
    endpoint = WebhookEndpoint.objects.create(url=url, secret=SECRET, event_types=[])
    delivery = WebhookDelivery.objects.create(
        endpoint=endpoint, event_type="ping", payload={}, max_attempts=1, next_attempt_at=_now()
    )
    sent = webhook_deliver(delivery_id=delivery.pk)
    assert sent is not None
    return sent


def test_redirects_are_not_followed(db: Any, inner: Receiver) -> None:
    hostile = Hostile("redirect", target=inner.url)
    try:
        sent = _deliver_to(hostile.url)
    finally:
        hostile.close()
    assert sent.status == "failed" and sent.response_code == 307
    assert "redirects are not followed" in sent.last_error
    assert inner.requests == []


def test_a_huge_answer_is_not_read(db: Any, settings: Any) -> None:
    settings.WEBHOOK_MAX_RESPONSE_BYTES = 4096
    hostile = Hostile("huge")
    try:
        sent = _deliver_to(hostile.url)
    finally:
        hostile.close()
    assert sent.status == "failed" and "larger than 4096 bytes" in sent.last_error


def test_a_slow_answer_stops_at_the_deadline(db: Any, settings: Any) -> None:
    settings.WEBHOOK_TIMEOUT_S = 1.0
    hostile = Hostile("drip")
    try:
        sent = _deliver_to(hostile.url)
    finally:
        hostile.close()
    assert sent.status == "failed" and "no complete response within 1 s" in sent.last_error


def test_ping_goes_through_a_worker_and_errors_are_for_operators(
    db: Any, operator_client: Any, viewer_client: Any, django_capture_on_commit_callbacks: Any
) -> None:
    receiver = Receiver()
    receiver.codes = [500]
    try:
        endpoint = WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET, event_types=[])
        sent: list[Any] = []
        with django_capture_on_commit_callbacks(execute=False) as callbacks:
            response = operator_client.post(f"/api/v1/webhooks/{endpoint.pk}/test/")
        assert response.status_code == 202 and response.json()["status"] == "pending"
        assert receiver.requests == [] and len(callbacks) == 1  # queued for a worker, not sent here
        sent.append(webhook_deliver(delivery_id=response.json()["id"]))
        assert sent[0].status == "failed" and "HTTP 500: boom" in sent[0].last_error
        as_operator = operator_client.get(f"/api/v1/webhooks/{endpoint.pk}/deliveries/").json()
        as_viewer = viewer_client.get(f"/api/v1/webhooks/{endpoint.pk}/deliveries/").json()
        assert "boom" in as_operator["results"][0]["last_error"]
        assert "boom" not in as_viewer["results"][0]["last_error"]
        assert as_viewer["results"][0]["response_code"] == 500
    finally:
        receiver.close()
