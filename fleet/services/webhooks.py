"""Signed outbound webhooks: public domain events become deliveries, retried with backoff.

Every request carries:

- `X-Flotilla-Event`: the event type; `X-Flotilla-Delivery`: the event id (stable over
  retries, so a receiver can drop duplicates);
- `X-Flotilla-Timestamp`: Unix seconds when this attempt was signed;
- `X-Flotilla-Signature: sha256=<hex>`: HMAC-SHA256 under the endpoint's secret of
  `"{timestamp}." + raw body`. Signing the timestamp with the body lets a receiver refuse
  replays older than a few minutes; checking it is `hmac.compare_digest` against the
  same computation.

Deliveries go only to public addresses unless allow-listed (:mod:`fleet.outbound`,
checked again when connecting), follow no redirects, and stop at a total deadline
(`WEBHOOK_TIMEOUT_S`) and a response-size cap (`WEBHOOK_MAX_RESPONSE_BYTES`): a
receiver can neither steer the server inside nor hold a worker.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import time
from datetime import datetime, timedelta
from typing import Any

import httpx
from django.conf import settings
from django.db.models import F
from django.utils import timezone

from core.api import ServiceError
from core.dispatch import enqueue_on_commit
from core.events import Event, public_event_types
from fleet.models import WebhookDelivery, WebhookEndpoint
from fleet.outbound import AddressRefused, resolve_target

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Flotilla-Signature"
TIMESTAMP_HEADER = "X-Flotilla-Timestamp"
EVENT_HEADER = "X-Flotilla-Event"
DELIVERY_HEADER = "X-Flotilla-Delivery"


# What receivers can subscribe to: the public domain events (core.events), and "ping".
def event_types() -> list[str]:
    """Event types an endpoint may name (the public domain events)."""
    return public_event_types()


def _setting(name: str, default: float) -> float:
    return float(getattr(settings, name, default))


def webhook_signature(*, secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Flotilla-Signature` value for a body sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def webhook_verify(
    *, secret: str, timestamp: str, body: bytes, signature: str, max_age_s: float = 300.0
) -> bool:
    """What a receiver does: check the signature in constant time and the timestamp's age."""
    expected = webhook_signature(secret=secret, timestamp=timestamp, body=body)
    try:
        fresh = abs(time.time() - float(timestamp)) <= max_age_s
    except ValueError:
        return False
    return fresh and hmac.compare_digest(expected, signature)


def _matches(endpoint_types: list[str], event_type: str) -> bool:
    if not endpoint_types:
        return True
    for pattern in endpoint_types:
        if pattern == event_type or (pattern.endswith(".*") and event_type.startswith(pattern[:-1])):
            return True
    return False


def _create_deliveries(event_type: str, payload: dict[str, Any]) -> list[int]:
    now = timezone.now()
    max_attempts = int(_setting("WEBHOOK_MAX_ATTEMPTS", 6))
    ids: list[int] = []
    for endpoint in WebhookEndpoint.objects.filter(active=True):
        if not _matches(list(endpoint.event_types or []), event_type):
            continue
        delivery = WebhookDelivery.objects.create(
            endpoint=endpoint,
            event_type=event_type,
            payload=payload,
            next_attempt_at=now,
            max_attempts=max_attempts,
        )
        ids.append(delivery.pk)
    return ids


def webhook_event_received(event: Event) -> None:
    """Subscriber of every public domain event: one delivery per subscribed endpoint.

    Called after the transaction that emitted the event committed, so a receiver never
    hears of a state that was rolled back. Each delivery is then sent by a Celery task;
    a lost message is sent by ``fleet.webhooks_retry_due``, which finds it pending.
    """
    for delivery_id in _create_deliveries(event.name, dict(event.payload)):
        enqueue_on_commit("fleet.webhooks_deliver", delivery_id)


def webhook_body(*, delivery: WebhookDelivery) -> bytes:
    """The exact bytes sent for a delivery: the same on every attempt."""
    envelope = {
        "id": str(delivery.event_id),
        "type": delivery.event_type,
        "created_at": delivery.created_at.isoformat(),
        "data": delivery.payload,
    }
    return json.dumps(envelope, separators=(",", ":"), sort_keys=True).encode()


def backoff_s(*, attempts: int) -> float:
    """Delay before the next attempt after `attempts` failures: exponential, equal jitter.

    Half the exponential delay is fixed and half random, so retries from many deliveries
    spread out but never come back sooner than half the nominal delay.
    """
    base = _setting("WEBHOOK_BACKOFF_BASE_S", 10.0)
    cap = _setting("WEBHOOK_BACKOFF_MAX_S", 3600.0)
    nominal = min(cap, base * (2 ** max(0, attempts - 1)))
    return nominal / 2 + random.uniform(0, nominal / 2)


def webhook_deliver(*, delivery_id: int, now: datetime | None = None) -> WebhookDelivery | None:
    """Try one delivery if it is due; returns it updated, or None if it was not ours to send.

    The attempt is claimed with a conditional update that moves `next_attempt_at` past a
    lease, so two workers (or a retry racing the first send) never post the same attempt
    twice; the HTTP call happens outside any transaction.
    """
    now = now or timezone.now()
    timeout = _setting("WEBHOOK_TIMEOUT_S", 10.0)
    lease = now + timedelta(seconds=timeout + 30)
    claimed = WebhookDelivery.objects.filter(
        pk=delivery_id, status=WebhookDelivery.Status.PENDING, next_attempt_at__lte=now
    ).update(next_attempt_at=lease, attempts=F("attempts") + 1)
    if claimed != 1:
        return None
    delivery = WebhookDelivery.objects.select_related("endpoint").get(pk=delivery_id)
    endpoint = delivery.endpoint
    body = webhook_body(delivery=delivery)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "Flotilla-Webhooks/1",
        EVENT_HEADER: delivery.event_type,
        DELIVERY_HEADER: str(delivery.event_id),
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: webhook_signature(secret=endpoint.secret, timestamp=timestamp, body=body),
    }
    code, error = _post(endpoint.url, body=body, headers=headers, deadline_s=timeout)
    finished = timezone.now()
    if not error:
        delivery.status = WebhookDelivery.Status.DELIVERED
        delivery.delivered_at = finished
        delivery.last_error = ""
    elif delivery.attempts >= delivery.max_attempts:
        delivery.status = WebhookDelivery.Status.FAILED
        delivery.last_error = error
    else:
        delivery.last_error = error
        delivery.next_attempt_at = finished + timedelta(seconds=backoff_s(attempts=delivery.attempts))
    delivery.response_code = code
    delivery.save(update_fields=["status", "delivered_at", "last_error", "next_attempt_at", "response_code"])
    return delivery


def _post(url: str, *, body: bytes, headers: dict[str, str], deadline_s: float) -> tuple[int | None, str]:
    """POST once to a checked address: ``(status code or None, error or "")``."""
    try:
        target = resolve_target(url)
    except AddressRefused as exc:
        return None, f"address refused: {exc}"
    limit = int(_setting("WEBHOOK_MAX_RESPONSE_BYTES", 65536))
    started = time.monotonic()
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        with (
            httpx.Client(timeout=deadline_s, follow_redirects=False) as client,
            client.stream(
                "POST",
                target.url,
                content=body,
                headers={**headers, "Host": target.host_header},
                extensions=extensions,
            ) as response,
        ):
            code = response.status_code
            received = bytearray()
            for chunk in response.iter_bytes():
                received += chunk
                if len(received) > limit:
                    return code, f"HTTP {code}: response larger than {limit} bytes, not read"
                if time.monotonic() - started > deadline_s:
                    return code, f"HTTP {code}: no complete response within {deadline_s:g} s"
    except httpx.HTTPError as exc:
        return None, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= code < 300:
        return code, ""
    if 300 <= code < 400:
        return code, f"HTTP {code}: redirects are not followed"
    return code, f"HTTP {code}: {bytes(received[:200]).decode(errors='replace')}"


def webhook_deliveries_due(*, now: datetime | None = None, limit: int = 200) -> list[int]:
    """Ids of pending deliveries whose next attempt is due."""
    now = now or timezone.now()
    qs = WebhookDelivery.objects.filter(status=WebhookDelivery.Status.PENDING, next_attempt_at__lte=now)
    return list(qs.order_by("next_attempt_at").values_list("pk", flat=True)[:limit])


def webhook_endpoint_test(*, endpoint_id: int) -> WebhookDelivery:
    """Queue a `ping` delivery to one endpoint (whatever its event types) for a worker to send.

    Sent by Celery like every delivery, never from the web process: a slow or hostile
    receiver holds a worker slot for at most the deadline, and no web thread at all.
    """
    endpoint = WebhookEndpoint.objects.filter(pk=endpoint_id).first()
    if endpoint is None:
        raise ServiceError("No such webhook endpoint.", code="not_found", status_code=404)
    delivery = WebhookDelivery.objects.create(
        endpoint=endpoint,
        event_type="ping",
        payload={"endpoint": endpoint.pk},
        next_attempt_at=timezone.now(),
        max_attempts=1,
    )
    enqueue_on_commit("fleet.webhooks_deliver", delivery.pk)
    return delivery
