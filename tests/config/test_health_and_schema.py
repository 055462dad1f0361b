from typing import Any

import pytest

pytestmark = pytest.mark.django_db


def test_healthz_answers_without_auth(client: Any) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_checks_database_and_redis(client: Any) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_readyz_reports_unreachable_redis(client: Any, settings: Any) -> None:
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["redis"].startswith("error")


def test_openapi_schema_builds_without_warnings(client: Any) -> None:
    response = client.get("/api/schema/?format=json")
    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "Flotilla API"
    assert "/api/v1/audit-events/" in schema["paths"]


def test_api_docs_page_renders(client: Any) -> None:
    assert client.get("/api/docs/").status_code == 200


def test_roles_exist() -> None:
    from django.contrib.auth.models import Group

    assert set(Group.objects.values_list("name", flat=True)) >= {"viewer", "operator", "admin"}


def test_audit_log_is_admin_only(
    viewer_client: Any, operator_client: Any, admin_client_api: Any, anon_client: Any
) -> None:
    assert anon_client.get("/api/v1/audit-events/").status_code == 401
    denied = operator_client.get("/api/v1/audit-events/")
    assert denied.status_code == 403
    assert denied.json()["error"]["code"] == "permission_denied"
    assert viewer_client.get("/api/v1/audit-events/").status_code == 403
    assert admin_client_api.get("/api/v1/audit-events/").status_code == 200


def test_openapi_schema_is_valid_and_free_of_warnings(tmp_path: Any) -> None:
    from django.core.management import call_command

    # --fail-on-warn turns any unresolved serializer, enum clash or missing auth
    # description into an error; --validate checks the result against the OpenAPI spec.
    call_command("spectacular", "--file", str(tmp_path / "schema.yaml"), "--validate", "--fail-on-warn")
    assert (tmp_path / "schema.yaml").stat().st_size > 10_000
