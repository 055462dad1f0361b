"""Small middleware of the project."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.middleware import AuthenticationMiddleware as _AuthenticationMiddleware
from django.contrib.messages.middleware import MessageMiddleware as _MessageMiddleware
from django.contrib.sessions.middleware import SessionMiddleware as _SessionMiddleware
from django.http import HttpRequest, HttpResponseBase
from django.utils.deprecation import MiddlewareMixin

DEVICE_API_PREFIX = "/api/agent/"

# Headers SecurityMiddleware and XFrameOptionsMiddleware add for browsers. Devices never
# render a page, and on a heartbeat every minute these are a fifth of the answer.
BROWSER_ONLY_HEADERS = (
    "X-Frame-Options",
    "Referrer-Policy",
    "Cross-Origin-Opener-Policy",
    "X-Content-Type-Options",
)


class DeviceApiHeadersMiddleware(MiddlewareMixin):
    """Strip browser-only headers from the device API's responses (`/api/agent/`).

    Listed first in MIDDLEWARE, so it sees the response after every other middleware
    added its headers; other paths keep them. MiddlewareMixin keeps it usable in both
    sync and async chains, so it does not force the ASGI server through a thread.
    """

    def process_response(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if request.path.startswith(DEVICE_API_PREFIX):
            for name in BROWSER_ONLY_HEADERS:
                if name in response:
                    del response[name]
        return response


class RefuseNulMiddleware(MiddlewareMixin):
    """Answer 400 to a path or query string holding a NUL character.

    PostgreSQL's text cannot store one, so a lookup with it fails at the database (a 500);
    bodies are checked by the parsers (``core.parsers``, ``fleet.auth.json_body``).
    """

    def process_request(self, request: HttpRequest) -> HttpResponseBase | None:
        query = request.META.get("QUERY_STRING", "")
        if "\x00" in request.path or "%00" in query or "\x00" in query:
            from core.api import error_response
            from core.parsers import NUL_MESSAGE

            return error_response(status_code=400, code="validation_error", message=NUL_MESSAGE)
        return None


class _SkippedOnDeviceApi(MiddlewareMixin):
    """Pass device API requests (`/api/agent/`) straight on to the next layer.

    Sessions, the user and flash messages exist for the dashboard and the operator API; a
    board authenticates with its own header (``fleet.auth``) and uses none of them, yet
    building the three (a session store, a lazy user, a message storage with its cookie
    signer) was a tenth of a heartbeat's server time. Returning the next layer's result
    unchanged keeps this usable in sync and async chains alike.
    """

    def __call__(self, request: HttpRequest) -> Any:
        if request.path.startswith(DEVICE_API_PREFIX):
            return self.get_response(request)
        return super().__call__(request)


class SessionMiddleware(_SkippedOnDeviceApi, _SessionMiddleware):
    """Django's, skipped on the device API."""


class AuthenticationMiddleware(_SkippedOnDeviceApi, _AuthenticationMiddleware):
    """Django's, skipped on the device API (which has no session to read a user from)."""


class MessageMiddleware(_SkippedOnDeviceApi, _MessageMiddleware):
    """Django's, skipped on the device API."""
