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
from typing import Any, cast

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, close_old_connections, connections
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from core import ratelimit
from core.api import ServiceError, error_response
from core.parsers import NUL_MESSAGE, holds_nul
from core.ratelimit import client_address
from devices_agent.wire import AUTH_SCHEME
from fleet.models import Device
from fleet.services.liveness import liveness_queue

__all__ = [
    "AgentView",
    "DeviceAuthBeforeBody",
    "authenticate",
    "authenticate_limited",
    "device_endpoint",
    "device_for_secret",
    "device_from_authorization",
    "hash_secret",
    "new_secret",
    "requires_device",
    "seen_buffered",
]

DEVICE_API_PATH = "/api/agent/"
SECRET_BYTES = 32
MAX_SECRET_LENGTH = 200

AgentView = Callable[..., dict[str, Any] | HttpResponseBase]
# Where DeviceAuthBeforeBody leaves the device it authenticated in the ASGI scope (a key a
# client cannot set: the scope is built by the server).
_SCOPE_DEVICE = "flotilla.device"
_SEEN_BUFFERED = "flotilla_seen_buffered"


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
    scope = getattr(request, "scope", None)  # under ASGI, DeviceAuthBeforeBody found it already
    if scope is not None and isinstance(scope.get(_SCOPE_DEVICE), Device):
        return cast(Device, scope[_SCOPE_DEVICE])
    device = device_from_authorization(request.META.get("HTTP_AUTHORIZATION", ""))
    if device is None:
        raise ServiceError(
            "Unknown or revoked device credentials (Authorization: Device <secret>).",
            code="not_authenticated",
            status_code=401,
        )
    return device


def authenticate_limited(request: HttpRequest, *, liveness: bool = False) -> Device:
    """:func:`authenticate` under the rate limits: failed credentials count per client address
    (``device_auth_failure``: guessing secrets, or a fleet of revoked boards retrying), and a
    device's requests count per device (``device``). 429 ``rate_limited`` past either.

    ``liveness``: the device's "seen now" goes into the liveness buffer in the counter's
    own round trip (``fleet.services.liveness``); :func:`seen_buffered` then says whether
    it got there.
    """
    try:
        device = authenticate(request)
    except ServiceError:
        ratelimit.check("device_auth_failure", client_address(request) or "")
        raise
    also = liveness_queue(device.pk) if liveness else None
    buffered = ratelimit.check("device", str(device.pk), also=also)
    if liveness:
        setattr(request, _SEEN_BUFFERED, buffered)
    return device


def seen_buffered(request: HttpRequest) -> bool:
    """Whether this request's "seen now" is in the liveness buffer (else the view writes it)."""
    return getattr(request, _SEEN_BUFFERED, False) is True


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
    # Only an escape can put a NUL into a string of valid JSON: search the bytes first.
    if b"\\u0000" in raw and holds_nul(body):
        raise ServiceError(NUL_MESSAGE, code="validation_error")
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
    *,
    methods: tuple[str, ...] = ("POST",),
    auth: bool = True,
    json: bool = True,
    limit_scope: str = "enroll",
    liveness: bool = False,
) -> Callable[[AgentView], Any]:
    """Wrap a device API view: method check, authentication, JSON body, errors.

    The view is called as ``view(request, device, body, **url_kwargs)``: ``device`` is None
    when ``auth=False`` (enrollment), ``body`` is the parsed JSON object of a POST when
    ``json=True`` and None otherwise (the view reads a raw body itself). It returns a dict
    (sent as compact JSON) or a response. Rate limits apply before the body is read: per
    device, or with ``auth=False`` per client address under ``limit_scope``. ``liveness``
    (the heartbeat): the device's "seen now" is buffered with the rate limit's count (see
    :func:`authenticate_limited`).
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
                if auth:
                    device: Device | None = authenticate_limited(request, liveness=liveness)
                else:
                    # Before credentials (enrollment): per client address, before the body.
                    ratelimit.check(limit_scope, client_address(request) or "")
                    device = None
                body = json_body(request) if json and request.method == "POST" else None
                result = view(request, device, body, **kwargs)
            except ServiceError as exc:
                return error(exc)
            if isinstance(result, HttpResponseBase):
                return result
            # Compact JSON: on a heartbeat every minute, the spaces of the default
            # separators are a few percent of a device's daily traffic.
            return JsonResponse(result, json_dumps_params={"separators": (",", ":")})

        # What DeviceAuthBeforeBody checks before an ASGI server reads the body.
        wrapper.flotilla_device_auth = auth  # type: ignore[attr-defined]
        wrapper.flotilla_max_body = "AGENT_MAX_BODY_BYTES" if json else None  # type: ignore[attr-defined]
        return wrapper

    return decorate


def requires_device(view: Any) -> Any:
    """Mark an async device view that authenticates itself (the long poll) for DeviceAuthBeforeBody."""
    view.flotilla_device_auth = True
    view.flotilla_max_body = None
    return view


class _PeerRequest:
    """Just enough of a request for core.ratelimit.client_address, from an ASGI scope."""

    def __init__(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> None:
        client = scope.get("client") or ("", 0)
        self.META = {
            "REMOTE_ADDR": client[0] or "",
            "HTTP_X_FORWARDED_FOR": headers.get(b"x-forwarded-for", b"").decode("latin-1"),
        }


class DeviceAuthBeforeBody:
    """ASGI middleware: the device API's credentials (and declared size) checked before the body is read.

    Django's ASGI handler reads a request's whole body before it calls a view, so under
    the ASGI server a stranger could make the server wait for, and spool, a large or
    slow body before ``device_endpoint`` ever looks at the ``Authorization`` header.
    This runs first: for a device API view that needs credentials it looks the device up
    from the headers alone and answers 401 (or 429 past ``device_auth_failure``) at once;
    a JSON view's declared ``Content-Length`` over ``AGENT_MAX_BODY_BYTES`` is a 413. The
    device it found rides in the scope, so the view does not look it up again.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(DEVICE_API_PATH):
            return await self.app(scope, receive, send)
        from asgiref.sync import sync_to_async
        from django.urls import Resolver404, resolve

        try:
            view = resolve(path).func
        except Resolver404:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        refused: ServiceError | None = None
        if getattr(view, "flotilla_device_auth", False):
            header = headers.get(b"authorization", b"").decode("latin-1")
            found = await sync_to_async(self._device, thread_sensitive=True)(header, scope, headers)
            if isinstance(found, ServiceError):
                refused = found
            else:
                scope = {**scope, _SCOPE_DEVICE: found}
        max_body = getattr(view, "flotilla_max_body", None)
        declared = headers.get(b"content-length", b"0")
        if (
            refused is None
            and max_body
            and declared.isdigit()
            and int(declared) > getattr(settings, max_body)
        ):
            refused = ServiceError("Request body is too large.", code="too_large", status_code=413)
        if refused is None:
            return await self.app(scope, receive, send)
        response = error(refused)
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.items()]
                + [(b"content-length", str(len(response.content)).encode()), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": response.content})

    @staticmethod
    def _device(header: str, scope: dict[str, Any], headers: dict[bytes, bytes]) -> Device | ServiceError:
        try:
            device = device_from_authorization(header)
            if device is None:
                ratelimit.check("device_auth_failure", client_address(_PeerRequest(scope, headers)) or "")
                return ServiceError(
                    "Unknown or revoked device credentials (Authorization: Device <secret>).",
                    code="not_authenticated",
                    status_code=401,
                )
            return device
        except ServiceError as exc:
            return exc
        finally:
            # This thread is Django's thread-sensitive one; give the connection back to its
            # CONN_MAX_AGE handling like a request would.
            close_old_connections()
