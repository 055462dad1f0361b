"""Inputs that once made the API answer 500 answer a 4xx in the one error shape, and the
schema documents the device API and every operation's error answers."""

from __future__ import annotations

from typing import Any

import pytest

from tests.training.federated.conftest import make_fleet

pytestmark = pytest.mark.django_db

HUGE = "9" * 30


def _error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"} and {"code", "message", "details"} <= set(body["error"])
    return body["error"]


@pytest.mark.parametrize("value", ["null", "true", "0.5", "-1", HUGE])
@pytest.mark.parametrize("name", ["version", "desired_version"])
def test_device_list_refuses_version_filters_that_are_not_ids(
    operator_client: Any, name: str, value: str
) -> None:
    error = _error(operator_client.get(f"/api/v1/devices/?{name}={value}"), 400)
    assert error["code"] == "validation_error" and name in error["message"]


def test_device_list_still_filters_by_version_and_by_a_group_named_by_digits(operator_client: Any) -> None:
    fleet = make_fleet(n_devices=2)
    listed = operator_client.get(f"/api/v1/devices/?desired_version={fleet.version.pk}")
    assert listed.status_code == 200
    # A number no id can be is a group name (none here), not a query that overflows.
    assert operator_client.get(f"/api/v1/devices/?group={HUGE}").json()["count"] == 0
    assert operator_client.get(f"/api/v1/personalisation/?group={HUGE}").status_code == 200


@pytest.mark.parametrize("job_id", ["null%2Cnull", "abc", HUGE, "0x1"])
@pytest.mark.parametrize("verb", ["start", "pause", "resume", "cancel"])
def test_job_actions_on_ids_that_are_not_numbers_are_not_found(
    operator_client: Any, verb: str, job_id: str
) -> None:
    error = _error(operator_client.post(f"/api/v1/federated-jobs/{job_id}/{verb}/"), 404)
    assert error["code"] == "not_found"


def test_detail_routes_take_only_ids_a_bigint_holds(operator_client: Any) -> None:
    for path in ("federated-jobs", "device-groups", "models", "rollouts", "webhooks", "audit-events"):
        assert operator_client.get(f"/api/v1/{path}/{HUGE}/").status_code == 404
    assert operator_client.get(f"/api/v1/federated-jobs/1/rounds/{HUGE}/updates/").status_code == 404


def test_integers_past_the_column_range_are_refused_in_bodies(operator_client: Any) -> None:
    fleet = make_fleet(n_devices=1)
    device = fleet.devices[0]
    huge = int(HUGE)
    assigned = operator_client.post(
        f"/api/v1/devices/{device.pk}/assign-version/", {"version": huge}, format="json"
    )
    assert _error(assigned, 400)["code"] == "validation_error"
    patched = operator_client.patch(f"/api/v1/devices/{device.pk}/", {"groups": [huge]}, format="json")
    assert _error(patched, 400)["code"] == "validation_error"
    job = operator_client.post(
        "/api/v1/federated-jobs/",
        {"name": "j", "family": fleet.family.pk, "base_version": huge, "target_group": fleet.group.pk},
        format="json",
    )
    assert "base_version" in _error(job, 400)["details"]
    rollout = operator_client.post(
        "/api/v1/rollouts/", {"version": fleet.version.pk, "max_retries": huge, "waves": []}, format="json"
    )
    assert "max_retries" in _error(rollout, 400)["details"]
    assert _error(operator_client.get(f"/api/v1/drift/?group={HUGE}"), 400)["code"] == "validation_error"


def test_deleting_a_group_a_federated_job_uses_is_a_conflict_naming_the_job(operator_client: Any) -> None:
    from fleet.models import DeviceGroup
    from training.models import FederatedJob

    fleet = make_fleet(n_devices=1)
    job = FederatedJob.objects.create(
        name="uses-the-group", family=fleet.family, base_version=fleet.version, target_group=fleet.group
    )
    error = _error(operator_client.delete(f"/api/v1/device-groups/{fleet.group.pk}/"), 409)
    assert error["code"] == "still_referenced"
    assert f"federated job {job.pk}" in error["message"].lower()
    assert DeviceGroup.objects.filter(pk=fleet.group.pk).exists()


def _schema(client: Any) -> dict[str, Any]:
    response = client.get("/api/schema/?format=json")
    assert response.status_code == 200
    schema: dict[str, Any] = response.json()
    return schema


def test_schema_has_the_device_api_with_its_auth_and_binary_bodies(client: Any) -> None:
    schema = _schema(client)
    device_ops = {
        (path, method): op
        for path, item in schema["paths"].items()
        if path.startswith("/api/agent/v1/")
        for method, op in item.items()
    }
    assert {("/api/agent/v1/heartbeat", "post"), ("/api/agent/v1/rounds/{round_id}/update", "post")} <= set(
        device_ops
    )
    assert all(op["tags"] == ["device"] for op in device_ops.values())
    scheme = schema["components"]["securitySchemes"]["deviceAuth"]
    assert (
        scheme["in"] == "header" and scheme["name"] == "Authorization" and "Device" in scheme["description"]
    )
    assert device_ops[("/api/agent/v1/enroll", "post")]["security"] == []
    assert device_ops[("/api/agent/v1/heartbeat", "post")]["security"] == [{"deviceAuth": []}]
    upload = device_ops[("/api/agent/v1/rounds/{round_id}/update", "post")]["requestBody"]["content"]
    assert upload["application/octet-stream"]["schema"]["format"] == "binary"
    artifact = device_ops[("/api/agent/v1/artifacts/{sha256}", "get")]["responses"]
    assert artifact["200"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert {"206", "304", "401", "404", "416"} <= set(artifact)


def test_every_operation_documents_its_errors_in_the_one_shape(client: Any) -> None:
    schema = _schema(client)
    assert "Error" in schema["components"]["schemas"]
    for path, item in schema["paths"].items():
        for method, op in item.items():
            codes = set(op["responses"])
            secured = any(op.get("security") or [])
            if secured:
                assert "401" in codes, (method, path)
            if path.startswith("/api/v1/") and secured:
                assert "403" in codes, (method, path)
            if "{" in path:
                assert "404" in codes, (method, path)
            if "requestBody" in op:
                assert {"400", "413"} <= codes, (method, path)
            # Rate limits: the operator API's throttle, every device call.
            assert "429" in codes, (method, path)
            for code, response in op["responses"].items():
                if code.startswith("4"):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }, (method, path, code)


def test_agent_requirements_refuses_a_bare_flag_that_is_not_a_boolean(operator_client: Any) -> None:
    assert operator_client.get("/api/v1/agent/requirements/?bare=true").status_code == 200
    assert _error(operator_client.get("/api/v1/agent/requirements/?bare=maybe"), 400)["code"] == (
        "validation_error"
    )


def test_page_size_must_be_a_positive_integer(operator_client: Any) -> None:
    for bad in ("false", "0", "1.5", "-3"):
        assert _error(operator_client.get(f"/api/v1/rollouts/?page_size={bad}"), 400)["code"] == (
            "validation_error"
        )
    assert operator_client.get("/api/v1/rollouts/?page_size=100000").status_code == 200


def test_operator_writes_take_json_only(operator_client: Any) -> None:
    posted = operator_client.post(
        "/api/v1/update-policies/", {"name": "p", "timezone": ""}, format="multipart"
    )
    assert _error(posted, 415)["code"] == "unsupported_media_type"


def test_integer_column_filters_take_whole_numbers_only(operator_client: Any, admin_client_api: Any) -> None:
    for bad in ("0.5", "x", HUGE):
        assert _error(operator_client.get(f"/api/v1/known-hosts/?port={bad}"), 400)["code"] == (
            "validation_error"
        )
    assert operator_client.get("/api/v1/known-hosts/?port=22").status_code == 200
    assert admin_client_api.get("/api/v1/audit-events/?target_id=3").status_code == 200


def test_long_poll_wait_must_be_a_finite_number_of_seconds(client: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from fleet.services.enrollment import enrollment_token_create

    _, token = enrollment_token_create(
        actor=None, name="w", max_uses=1, expires_at=timezone.now() + timedelta(hours=1)
    )
    enrolled = client.post(
        "/api/agent/v1/enroll",
        {"token": token, "name": "b", "hardware": {}},
        content_type="application/json",
    ).json()
    auth = {"HTTP_AUTHORIZATION": f"Device {enrolled['secret']}"}
    for bad in ("-1", "nan", "inf", "soon"):
        assert (
            _error(client.get(f"/api/agent/v1/rounds/?wait={bad}", **auth), 400)["code"] == "validation_error"
        )
    assert client.get("/api/agent/v1/rounds/?wait=0", **auth).json() == {"tasks": []}


def test_drift_reports_refuse_a_group_no_id_can_be(operator_client: Any) -> None:
    assert _error(operator_client.get(f"/api/v1/drift/reports/?group={HUGE}"), 400)["code"] == (
        "validation_error"
    )
    assert operator_client.get("/api/v1/drift/reports/?group=1").status_code == 200


def test_nul_characters_are_refused_at_the_door_on_both_apis(operator_client: Any, client: Any) -> None:
    """PostgreSQL text and jsonb cannot hold U+0000: a 400 here, never a 500 at the database."""
    import json

    from django.contrib.auth.models import Group

    from fleet.models import DeviceGroup

    # Operator API: a JSON body, in a value, a key, or deep inside a JSON field.
    for body in (
        {"name": "line\u00001"},
        {"name": "line-1", "tag_selector": {"tags\u0000": ["a"]}},
        {"name": "line-1", "tag_selector": {"tags": ["a\u0000"]}},
    ):
        response = operator_client.post(
            "/api/v1/device-groups/", json.dumps(body), content_type="application/json"
        )
        assert _error(response, 400)["code"] in {"parse_error", "validation_error"}
    assert not DeviceGroup.objects.filter(name__startswith="line").exists()
    # A multipart form field of an upload view.
    response = operator_client.post(
        "/api/v1/datasets/", {"family": "digits\x00", "name": "d"}, format="multipart"
    )
    assert _error(response, 400)
    # A query string or a path.
    assert _error(operator_client.get("/api/v1/devices/?search=a%00b"), 400)["code"] == "validation_error"
    assert _error(operator_client.get("/api/v1/device-groups/a%00b/"), 400)
    # Device API: the JSON body of enrollment.
    response = client.post(
        "/api/agent/v1/enroll",
        json.dumps({"token": "t", "name": "board\u0000", "hardware": {}}),
        content_type="application/json",
    )
    assert _error(response, 400)["code"] == "validation_error"
    assert Group.objects.exists()  # the database is still usable afterwards
