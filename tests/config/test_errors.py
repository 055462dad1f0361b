"""Unknown paths: the one JSON error shape under /api/, Django's HTML page elsewhere."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import RequestFactory

from config.errors import not_found, server_error

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize("path", ["/api/agent/v1/nope", "/api/v1/nope/", "/api/nope"])
def test_unknown_api_paths_answer_the_json_error_shape(client: Any, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert body["error"]["code"] == "not_found" and body["error"]["message"]
    assert set(body["error"]) == {"code", "message", "details"}


def test_unknown_device_api_path_has_no_browser_headers(client: Any) -> None:
    response = client.post("/api/agent/v1/nope", data=b"{}", content_type="application/json")
    assert response.status_code == 404 and "X-Frame-Options" not in response


def test_unknown_page_keeps_the_html_404(client: Any) -> None:
    response = client.get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")
    # Browser pages keep their security headers.
    assert response["X-Frame-Options"] == "DENY"


def test_server_error_is_json_under_api_and_html_elsewhere() -> None:
    factory = RequestFactory()
    api = server_error(factory.get("/api/v1/devices/"))
    assert api.status_code == 500 and api["Content-Type"] == "application/json"
    assert api.content.startswith(b'{"error": {"code": "server_error"')
    page = server_error(factory.get("/devices/"))
    assert page.status_code == 500 and page["Content-Type"].startswith("text/html")


def test_not_found_view_called_directly_outside_api_is_html() -> None:
    response = not_found(RequestFactory().get("/x"), None)
    assert response.status_code == 404 and response["Content-Type"].startswith("text/html")


def test_the_root_urlconf_installs_both_handlers() -> None:
    from django.urls import get_resolver

    resolver = get_resolver()
    assert resolver.resolve_error_handler(404) is not_found
    assert resolver.resolve_error_handler(500) is server_error
