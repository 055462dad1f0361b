"""Webhooks: signed deliveries to a real HTTP server on loopback, retried after a 500."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from django.utils import timezone

from core.events import emit
from fleet.models import WebhookDelivery, WebhookEndpoint
from fleet.services.webhooks import webhook_deliver, webhook_verify

SECRET = "s3cret-for-webhook-tests"


class Receiver:
    """A loopback HTTP server that answers with queued status codes and keeps requests."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.requests: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((dict(self.headers), body))
                code = receiver.codes.pop(0) if receiver.codes else 200
                self.send_response(code)
                self.end_headers()
                self.wfile.write(b"ok" if code < 300 else b"boom")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_signed_delivery_retried_after_500(
    db: Any, receiver: Receiver, django_capture_on_commit_callbacks: Any
) -> None:
    endpoint = WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET, event_types=["rollout.*"])
    WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET, event_types=["experiment.completed"])
    with django_capture_on_commit_callbacks(execute=True):
        emit(
            "rollout.paused",
            {"rollout_id": 7, "name": "r", "version_id": 1, "status": "paused", "wave": 0, "reason": ""},
        )
    (delivery,) = WebhookDelivery.objects.all()
    assert delivery.endpoint_id == endpoint.pk

    receiver.codes = [500]
    first = webhook_deliver(delivery_id=delivery.pk)
    assert first is not None
    assert first.status == "pending" and first.attempts == 1 and first.response_code == 500
    assert first.next_attempt_at > timezone.now() + timedelta(seconds=4)  # base 10 s, half fixed
    assert "HTTP 500" in first.last_error
    # Not due yet: a duplicate task run sends nothing.
    assert webhook_deliver(delivery_id=delivery.pk) is None
    assert len(receiver.requests) == 1

    second = webhook_deliver(delivery_id=delivery.pk, now=first.next_attempt_at)
    assert second is not None and second.status == "delivered" and second.attempts == 2
    assert len(receiver.requests) == 2
    bodies = {body for _, body in receiver.requests}
    assert len(bodies) == 1  # the same bytes on every attempt
    for headers, body in receiver.requests:
        assert headers["X-Flotilla-Event"] == "rollout.paused"
        assert headers["X-Flotilla-Delivery"] == str(delivery.event_id)
        assert webhook_verify(
            secret=SECRET,
            timestamp=headers["X-Flotilla-Timestamp"],
            body=body,
            signature=headers["X-Flotilla-Signature"],
        )
        assert not webhook_verify(
            secret="wrong-secret-wrong",
            timestamp=headers["X-Flotilla-Timestamp"],
            body=body,
            signature=headers["X-Flotilla-Signature"],
        )
        assert not webhook_verify(
            secret=SECRET,
            timestamp=headers["X-Flotilla-Timestamp"],
            body=body + b" ",
            signature=headers["X-Flotilla-Signature"],
        )


def test_attempts_are_bounded(db: Any, receiver: Receiver, settings: Any) -> None:
    settings.WEBHOOK_MAX_ATTEMPTS = 3
    endpoint = WebhookEndpoint.objects.create(url=receiver.url, secret=SECRET)
    delivery = WebhookDelivery.objects.create(
        endpoint=endpoint,
        event_type="rollout.aborted",
        payload={},
        next_attempt_at=timezone.now(),
        max_attempts=3,
    )
    receiver.codes = [500, 502, 503, 200]
    when = timezone.now()
    for _ in range(3):
        result = webhook_deliver(delivery_id=delivery.pk, now=when)
        assert result is not None
        when = result.next_attempt_at
    delivery.refresh_from_db()
    assert delivery.status == "failed" and delivery.attempts == 3 and delivery.response_code == 503
    assert webhook_deliver(delivery_id=delivery.pk, now=when + timedelta(days=1)) is None
    assert len(receiver.requests) == 3


def test_rollout_events_reach_the_delivery_log_api(
    fleet: Any, receiver: Receiver, operator_client: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from fleet.services.rollouts import rollout_create, rollout_pause, rollout_start

    f = fleet(5)
    response = operator_client.post(
        "/api/v1/webhooks/",
        {"name": "ops", "url": receiver.url, "secret": SECRET, "event_types": ["rollout.*"]},
        format="json",
    )
    assert response.status_code == 201, response.content
    assert "secret" not in response.json()
    endpoint_id = response.json()["id"]
    # The on-commit hooks run the event subscribers, which create the deliveries.
    with django_capture_on_commit_callbacks(execute=True):
        rollout = rollout_create(
            actor=None, data={"version": f.v2.pk, "target_group": f.group.pk, "waves": [{"percent": 100}]}
        )
        rollout_start(rollout_id=rollout.pk, actor=None)
        rollout_pause(rollout_id=rollout.pk, actor=None, reason="checking")
    for delivery in WebhookDelivery.objects.all():
        webhook_deliver(delivery_id=delivery.pk)
    log = operator_client.get(f"/api/v1/webhooks/{endpoint_id}/deliveries/").json()["results"]
    types = [row["event_type"] for row in log]
    assert set(types) == {"rollout.started", "rollout.paused"}
    assert all(row["status"] == "delivered" and row["response_code"] == 200 for row in log)
    bad = operator_client.post(
        "/api/v1/webhooks/", {"url": receiver.url, "secret": SECRET, "event_types": ["nope"]}, format="json"
    )
    assert bad.status_code == 400
