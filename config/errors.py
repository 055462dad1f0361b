"""Error pages: the one JSON error shape under `/api/`, Django's HTML pages elsewhere.

Django calls these (`handler404`, `handler500` in `config.urls`) only with DEBUG off.
"""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.views import defaults

from core.api import error_response

API_PREFIX = "/api/"


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith(API_PREFIX)


def not_found(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    """404: `{"error": {"code": "not_found", ...}}` under /api/, the HTML page otherwise."""
    if _is_api(request):
        return error_response(
            status_code=404, code="not_found", message=f"No API endpoint or object at {request.path}."
        )
    return defaults.page_not_found(request, exception)


def server_error(request: HttpRequest) -> HttpResponse:
    """500: `{"error": {"code": "server_error", ...}}` under /api/, the HTML page otherwise."""
    if _is_api(request):
        return error_response(status_code=500, code="server_error", message="Internal server error.")
    return defaults.server_error(request)
