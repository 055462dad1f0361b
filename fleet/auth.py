"""Device authentication, once for every device API view: `Authorization: Device <secret>`.

Secrets are 256-bit random strings, so an HMAC-SHA256 under a server key is as strong as a
password hash against guessing while costing microseconds on the heartbeat path, and it
lets the lookup be one indexed equality query.

:func:`device_endpoint` wraps every view of ``/api/agent/v1/`` (the fleet's and the
training rounds'): method check, authentication *before* the body is read (a stranger
cannot make the server read or parse megabytes), the JSON body when asked, and every
error in the one error shape. The websocket nudge socket and the long poll authenticate
through :func:`device_from_authorization`, the same lookup.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from core.api import ServiceError, error_response
from devices_agent.wire import AUTH_SCHEME
from fleet.models import Device

__all__ = [
    "AgentView",
    "authenticate",
    "device_endpoint",
    "device_for_secret",
    "device_from_authorization",
    "hash_secret",
    "new_secret",
]

SECRET_BYTES = 32
MAX_SECRET_LENGTH = 200

AgentView = Callable[..., dict[str, Any] | HttpResponseBase]


def new_secret() -> str:
    """A fresh device or enrollment secret (URL-safe, 43 characters)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str) -> str:
    """The keyed hash stored instead of a secret."""
    key = settings.DEVICE_SECRET_KEY.encode() or settings.SECRET_KEY.encode()
    return hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()


_PLACEHOLDER = "hash-placeholder"


def _compiled_lookup() -> tuple[str, list[str], Any, Any]:
    """The device lookup's SQL, compiled once per connection.

    Building the SELECT through the ORM costs more than running it, on every request of
    every device; the statement never changes, so it is compiled on first use and then
    run with only the hash as a parameter, its rows passed through the same converters
    the ORM would apply.
    """
    conn = connections[DEFAULT_DB_ALIAS]
    prepared = getattr(conn, "_flotilla_device_lookup", None)
    if prepared is None:
        names = [f.attname for f in Device._meta.concrete_fields]
        queryset = (
            Device.objects.filter(secret_hash=_PLACEHOLDER)
            .exclude(status=Device.Status.DECOMMISSIONED)
            .order_by()
            .values_list(*names)
        )
        compiler = queryset.query.get_compiler(using=DEFAULT_DB_ALIAS)
        sql, params = compiler.as_sql()
        if list(params) != [_PLACEHOLDER, Device.Status.DECOMMISSIONED.value]:  # pragma: no cover
            raise RuntimeError("the ORM compiled the device lookup differently; update fleet.auth")
        converters = compiler.get_converters([column[0] for column in compiler.select])
        prepared = (sql, names, compiler, converters)
        conn._flotilla_device_lookup = prepared  # type: ignore[attr-defined]
    return prepared


def device_for_secret(secret: str) -> Device | None:
    """The active device holding ``secret``, or None (unknown or decommissioned)."""
    if not secret or len(secret) > MAX_SECRET_LENGTH:
        return None
    sql, names, compiler, converters = _compiled_lookup()
    with connections[DEFAULT_DB_ALIAS].cursor() as cursor:
        cursor.execute(sql, [hash_secret(secret), Device.Status.DECOMMISSIONED.value])
        row = cursor.fetchone()
    if row is None:
        return None
    if converters:
        row = next(iter(compiler.apply_converters([row], converters)))
    return Device.from_db(DEFAULT_DB_ALIAS, names, list(row))


def device_from_authorization(header: str) -> Device | None:
    """The device an ``Authorization`` header value names (``Device <secret>``), or None."""
    scheme, _, secret = header.partition(" ")
    return device_for_secret(secret.strip()) if scheme == AUTH_SCHEME else None


def authenticate(request: HttpRequest) -> Device:
    """The calling device; a 401 ``not_authenticated`` ServiceError otherwise."""
    device = device_from_authorization(request.META.get("HTTP_AUTHORIZATION", ""))
    if device is None:
        raise ServiceError(
            "Unknown or revoked device credentials (Authorization: Device <secret>).",
            code="not_authenticated",
            status_code=401,
        )
    return device


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON")


def json_body(request: HttpRequest) -> dict[str, Any]:
    """The request's JSON object, at most ``AGENT_MAX_BODY_BYTES`` (413 past it, 400 if malformed)."""
    limit = int(settings.AGENT_MAX_BODY_BYTES)
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        raise ServiceError("Request body is too large.", code="too_large", status_code=413)
    raw = request.read(limit + 1)
    if len(raw) > limit:
        raise ServiceError("Request body is too large.", code="too_large", status_code=413)
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting
        raise ServiceError(f"Malformed JSON: {exc}", code="malformed_json") from exc
    if not isinstance(body, dict):
        raise ServiceError("The body must be a JSON object.", code="validation_error")
    return body


def error(exc: ServiceError) -> HttpResponse:
    """A refused device request in the one error shape (with the scheme to use on a 401)."""
    response = error_response(
        status_code=exc.status_code, code=exc.code, message=exc.message, details=exc.details
    )
    if exc.status_code == 401:
        response["WWW-Authenticate"] = AUTH_SCHEME
    if exc.retry_after_s is not None:
        response["Retry-After"] = str(exc.retry_after_s)
    return response


def device_endpoint(
    *, methods: tuple[str, ...] = ("POST",), auth: bool = True, json: bool = True
) -> Callable[[AgentView], Any]:
    """Wrap a device API view: method check, authentication, JSON body, errors.

    The view is called as ``view(request, device, body, **url_kwargs)``: ``device`` is None
    when ``auth=False`` (enrollment), ``body`` is the parsed JSON object of a POST when
    ``json=True`` and None otherwise (the view reads a raw body itself). It returns a dict
    (sent as compact JSON) or a response.
    """

    def decorate(view: AgentView) -> Any:
        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, **kwargs: Any) -> HttpResponseBase:
            if request.method not in methods:
                response = error_response(
                    status_code=405, code="method_not_allowed", message=f"Use {' or '.join(methods)}."
                )
                response["Allow"] = ", ".join(methods)
                return response
            try:
                device = authenticate(request) if auth else None
                body = json_body(request) if json and request.method == "POST" else None
                result = view(request, device, body, **kwargs)
            except ServiceError as exc:
                return error(exc)
            if isinstance(result, HttpResponseBase):
                return result
            # Compact JSON: on a heartbeat every minute, the spaces of the default
            # separators are a few percent of a device's daily traffic.
            return JsonResponse(result, json_dumps_params={"separators": (",", ":")})

        return wrapper

    return decorate
