"""core.ratelimit: rates, the client's address behind trusted proxies, the shared counter and
its local fallback, and the limits of the logins and the operator API."""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest
from django.test import override_settings

from core.ratelimit import Rate, RateLimited, check, client_address, parse_rate

_addresses = itertools.count(1)


def _fresh_address() -> str:
    """An address no earlier test counted for (counters live in the shared cache)."""
    n = next(_addresses) + uuid.uuid4().int % 50_000 * 100
    return f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256}"


def _limits(**rates: str) -> Any:
    from django.conf import settings

    return override_settings(RATE_LIMITS={**settings.RATE_LIMITS, **rates})


class _Req:
    def __init__(self, **meta: str) -> None:
        self.META = meta


def test_rates_parse() -> None:
    assert parse_rate("20/s") == Rate(20, 1)
    assert parse_rate("1200/min") == Rate(1200, 60)
    assert parse_rate("10/5min") == Rate(10, 300)
    assert parse_rate("3/d") == Rate(3, 86400)
    assert parse_rate("") is None and parse_rate("off") is None
    with pytest.raises(ValueError):
        parse_rate("many/s")


def test_the_client_address_is_the_peer_unless_a_trusted_proxy_forwarded_it() -> None:
    spoofed = _Req(REMOTE_ADDR="203.0.113.9", HTTP_X_FORWARDED_FOR="1.2.3.4")
    assert client_address(spoofed) == "203.0.113.9"  # no trusted proxies: headers are ignored
    with override_settings(TRUSTED_PROXIES=["172.16.0.0/12", "127.0.0.1/32"]):
        assert client_address(spoofed) == "203.0.113.9"  # the peer is not a trusted proxy
        # nginx appended the real peer after whatever the client claimed.
        via = _Req(REMOTE_ADDR="172.18.0.5", HTTP_X_FORWARDED_FOR="1.2.3.4, 198.51.100.7")
        assert client_address(via) == "198.51.100.7"
        # Two trusted hops: the right-most untrusted entry.
        hops = _Req(REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="9.9.9.9, 198.51.100.7, 172.18.0.5")
        assert client_address(hops) == "198.51.100.7"
        assert client_address(_Req(REMOTE_ADDR="172.18.0.5")) == "172.18.0.5"
        garbage = _Req(REMOTE_ADDR="172.18.0.5", HTTP_X_FORWARDED_FOR="1.2.3.4, not-an-ip")
        assert client_address(garbage) == "172.18.0.5"
        v6 = _Req(REMOTE_ADDR="127.0.0.1", HTTP_X_FORWARDED_FOR="[2001:db8::1]:4711")
        assert client_address(v6) == "2001:db8::1"


def test_a_fixed_window_refuses_past_the_rate_with_the_seconds_left() -> None:
    key = uuid.uuid4().hex
    with _limits(login="2/min"):
        check("login", key, now=600.0)
        check("login", key, now=610.0)
        with pytest.raises(RateLimited) as refused:
            check("login", key, now=615.5)
        assert refused.value.status_code == 429 and refused.value.retry_after_s == 45
        check("login", key, now=660.0)  # the next window
        check("login", "someone-else", now=615.5)
    with _limits(login="off"):
        for _ in range(5):
            check("login", key, now=615.5)


def test_the_shared_counter_is_one_per_window_and_expires_with_it() -> None:
    from django.core.cache import cache, caches

    key = uuid.uuid4().hex
    with _limits(login="3/min"):
        check("login", key, now=600.0)
        check("login", key, now=601.0)
    counter = f"rl:login:{key}:10"
    assert cache.get(counter) == 2  # the same counter Django's cache API reads
    backend: Any = caches["default"]
    ttl = backend._cache.get_client().ttl(backend.make_and_validate_key(counter))
    assert 0 < ttl <= 61


def test_without_the_shared_cache_the_count_is_kept_in_this_process() -> None:
    key = uuid.uuid4().hex
    unreachable = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
            "OPTIONS": {"socket_connect_timeout": 0.2},
        }
    }
    with override_settings(CACHES=unreachable), _limits(login="2/d"):
        check("login", key)
        check("login", key)
        with pytest.raises(RateLimited):
            check("login", key)


def test_dashboard_login_is_limited_per_address(client: Any, make_user: Any) -> None:
    user = make_user("viewer")
    address = _fresh_address()
    with _limits(login="2/d"):
        for _ in range(2):
            wrong = client.post("/login/", {"username": user.username, "password": "x"}, REMOTE_ADDR=address)
            assert wrong.status_code == 200  # the form again, with its error
        refused = client.post(
            "/login/", {"username": user.username, "password": "pw-Flotilla-1"}, REMOTE_ADDR=address
        )
        assert refused.status_code == 429 and int(refused["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "rate_limited"
        other = client.post(
            "/login/", {"username": user.username, "password": "pw-Flotilla-1"}, REMOTE_ADDR=_fresh_address()
        )
        assert other.status_code == 302


def test_token_login_answers_the_token_audits_the_forwarded_address_and_is_limited(
    anon_client: Any, make_user: Any
) -> None:
    from core.audit.models import AuditEvent

    user = make_user("operator")
    address = _fresh_address()
    body = {"username": user.username, "password": "pw-Flotilla-1"}
    with _limits(login="2/d"), override_settings(TRUSTED_PROXIES=["127.0.0.1/32"]):
        ok = anon_client.post("/api/v1/auth/token/", body, HTTP_X_FORWARDED_FOR=f"8.8.8.8, {address}")
        assert ok.status_code == 200, ok.content
        token = ok.json()["token"]
        event = AuditEvent.objects.get(action="api_token.issued")
        assert event.remote_addr == address and event.actor_id == user.pk
        bad = anon_client.post(
            "/api/v1/auth/token/", {**body, "password": "no"}, HTTP_X_FORWARDED_FOR=address
        )
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_credentials"
        refused = anon_client.post("/api/v1/auth/token/", body, HTTP_X_FORWARDED_FOR=address)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert int(refused["Retry-After"]) >= 1
    anon_client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert anon_client.get("/api/v1/devices/").status_code == 200


def test_the_operator_api_is_limited_per_user(operator_client: Any, viewer_client: Any) -> None:
    with _limits(api_user="2/d"):
        assert operator_client.get("/api/v1/devices/").status_code == 200
        assert operator_client.get("/api/v1/devices/").status_code == 200
        refused = operator_client.get("/api/v1/devices/")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert int(refused["Retry-After"]) >= 1
        assert viewer_client.get("/api/v1/devices/").status_code == 200


def test_wrong_api_tokens_are_limited_per_address(anon_client: Any, db: Any) -> None:
    address = _fresh_address()
    anon_client.credentials(HTTP_AUTHORIZATION="Token not-a-token")
    with _limits(api_anon="2/d"):
        for _ in range(2):
            assert anon_client.get("/api/v1/devices/", REMOTE_ADDR=address).status_code == 401
        refused = anon_client.get("/api/v1/devices/", REMOTE_ADDR=address)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert anon_client.get("/api/v1/devices/", REMOTE_ADDR=_fresh_address()).status_code == 401
