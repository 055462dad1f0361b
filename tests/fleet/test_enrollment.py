"""Enrollment through the device API: good tokens, bad tokens, and racing enrollments."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from fleet.auth import hash_secret
from fleet.models import Device, DeviceGroup, EnrollmentToken

# Only the fleet routes: these tests do not depend on the state of other apps' URL modules.
pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.fleet.urls")]


def _enroll(client: Any, token: str, **extra: Any) -> Any:
    body = {
        "token": token,
        "name": "board",
        "hardware": {"arch": "armv7l", "cores": 4, "ram_mb": 512},
        **extra,
    }
    return client.post("/api/agent/v1/enroll", data=json.dumps(body), content_type="application/json")


def test_enroll_creates_device_with_token_tags_group_and_hashed_secret(client: Any, make_token: Any) -> None:
    group = DeviceGroup.objects.create(name="lab")
    row, token = make_token(group=group, tags=["site-a"], device_tags_allowed=["cam*"], max_uses=2)
    response = _enroll(client, token, tags=["camera", "site-a"])
    assert response.status_code == 200
    body = response.json()
    device = Device.objects.get(pk=body["device_id"])
    assert device.secret_hash == hash_secret(body["secret"])
    assert body["secret"] not in json.dumps(list(Device.objects.values()), default=str)
    assert device.tags == ["site-a", "camera"]
    assert list(device.groups.values_list("name", flat=True)) == ["lab"]
    assert (device.arch, device.cores, device.ram_mb, device.status) == ("armv7l", 4, 512, "pending")
    assert len(body["signing_public_key"]) == 44  # base64 of 32 raw bytes
    row.refresh_from_db()
    assert row.use_count == 1


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"expires_at": timezone.now() - timedelta(seconds=1)}, 401, "token_expired"),
        ({"revoked_at": timezone.now()}, 403, "token_revoked"),
        ({"use_count": 1}, 403, "token_exhausted"),
    ],
)
def test_unusable_tokens_are_refused_with_their_reason(
    client: Any, make_token: Any, change: dict[str, Any], status: int, code: str
) -> None:
    row, token = make_token(max_uses=1)
    EnrollmentToken.objects.filter(pk=row.pk).update(**change)
    response = _enroll(client, token)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert Device.objects.count() == 0


def test_unknown_token_is_401_token_invalid(client: Any, make_token: Any) -> None:
    make_token()
    response = _enroll(client, "not-a-real-token")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_invalid"
    assert Device.objects.count() == 0


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "hardware": {}},
        {"token": 5, "name": "x", "hardware": {}},
        {"token": "t", "name": "", "hardware": {}},
        {"token": "t", "name": "x", "hardware": []},
        {"token": "t", "name": "x", "hardware": {"cores": "four"}},
        {"token": "t", "name": "x", "hardware": {}, "tags": ["has space"]},
    ],
)
def test_malformed_enrollment_is_400_and_uses_nothing(
    client: Any, make_token: Any, body: dict[str, Any]
) -> None:
    row, token = make_token()
    body = {**body, "token": token} if body.get("token") == "t" else body
    response = client.post("/api/agent/v1/enroll", data=json.dumps(body), content_type="application/json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "validation_error"
    row.refresh_from_db()
    assert row.use_count == 0


@pytest.mark.django_db(transaction=True)
def test_concurrent_enrollments_never_exceed_max_uses(make_token: Any) -> None:
    from django.db import connection
    from django.test import Client

    _, token = make_token(max_uses=3)
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def worker() -> None:
        try:
            barrier.wait()
            status = _enroll(Client(), token).status_code
            with lock:
                statuses.append(status)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200, 200, 200, 403, 403, 403, 403, 403]
    assert Device.objects.count() == 3
    assert EnrollmentToken.objects.get().use_count == 3


def test_a_device_cannot_tag_itself_into_a_group(client: Any, make_token: Any) -> None:
    """Tags select groups (and so policies, rollouts and rounds): only the token gives them."""
    DeviceGroup.objects.create(name="prod", tag_selector=["production"])
    row, token = make_token(tags=["site-a"], device_tags_allowed=["profile-*"], max_uses=2)
    refused = _enroll(client, token, tags=["production", "profile-slow"])
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "tags_not_allowed" and error["details"]["tags"] == ["production"]
    row.refresh_from_db()
    assert row.use_count == 0 and not Device.objects.exists()  # the refusal cost the token nothing
    allowed = _enroll(client, token, tags=["profile-slow", "site-a"])
    assert allowed.status_code == 200
    assert Device.objects.get().tags == ["site-a", "profile-slow"]
    assert not Device.objects.filter(groups__name="prod").exists()
