"""Rate limits of the device API: per device once authenticated, per client address before."""

from __future__ import annotations

import uuid
from typing import Any

from django.test import override_settings


def _limits(**rates: str) -> Any:
    from django.conf import settings

    return override_settings(RATE_LIMITS={**settings.RATE_LIMITS, **rates})


def _address() -> str:
    n = uuid.uuid4().int
    return f"10.{n % 256}.{n // 256 % 256}.{n // 65536 % 256}"


def test_a_device_past_its_rate_gets_429_with_retry_after(enroll: Any) -> None:
    agent, other = enroll(), enroll()
    with _limits(device="3/d"):
        for _ in range(3):
            assert agent.heartbeat().status_code == 200
        refused = agent.heartbeat()
        assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limited"
        assert refused.json()["error"]["details"]["scope"] == "device"
        # Every device API call counts, the long poll's path included; other devices are not affected.
        assert agent.get("rounds/").status_code == 429
        assert other.heartbeat().status_code == 200


def test_enrollment_is_limited_per_client_address(client: Any, make_token: Any) -> None:
    _, token = make_token(max_uses=10)
    address = _address()
    with _limits(enroll="2/d"):
        for _ in range(2):
            wrong = client.post(
                "/api/agent/v1/enroll",
                {"token": "nope"},
                content_type="application/json",
                REMOTE_ADDR=address,
            )
            assert wrong.status_code in (400, 401)
        refused = client.post(
            "/api/agent/v1/enroll", {"token": token}, content_type="application/json", REMOTE_ADDR=address
        )
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        ok = client.post(
            "/api/agent/v1/enroll",
            {"token": token, "name": "b", "hardware": {}},
            content_type="application/json",
            REMOTE_ADDR=_address(),
        )
        assert ok.status_code == 200, ok.content


def test_failed_device_credentials_are_limited_per_address(client: Any, enroll: Any) -> None:
    address = _address()
    agent = enroll()
    with _limits(device_auth_failure="2/d"):
        for _ in range(2):
            guess = client.post(
                "/api/agent/v1/heartbeat",
                "{}",
                content_type="application/json",
                HTTP_AUTHORIZATION="Device guess",
                REMOTE_ADDR=address,
            )
            assert guess.status_code == 401
        refused = client.post(
            "/api/agent/v1/heartbeat",
            "{}",
            content_type="application/json",
            HTTP_AUTHORIZATION="Device guess",
            REMOTE_ADDR=address,
        )
        assert refused.status_code == 429 and refused["Retry-After"]
        # A real device is refused nothing for the guesses of its neighbours.
        assert agent.heartbeat().status_code == 200
