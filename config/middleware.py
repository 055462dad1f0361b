"""Small middleware of the project."""

from __future__ import annotations

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
