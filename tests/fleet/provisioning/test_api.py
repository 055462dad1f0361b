"""Operator API of provisioning: roles, write-only credentials, audit, host keys."""

from __future__ import annotations

from typing import Any

import pytest

from tests.fleet.provisioning.conftest import Board

pytestmark = pytest.mark.django_db

URL = "/api/v1/provisioning-jobs/"


def _body(board: Board, **extra: Any) -> dict[str, Any]:
    return {
        "host": board.host,
        "port": board.port,
        "username": board.username,
        "private_key": board.private_key,
        "tags": ["line-3"],
        **extra,
    }


def test_operator_creates_a_job_and_no_response_or_audit_holds_the_key(
    board: Board, operator_client: Any, viewer_client: Any
) -> None:
    from core.audit.models import AuditEvent
    from fleet.models import ProvisioningJob

    response = operator_client.post(URL, _body(board), format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "queued"
    assert body["auth_method"] == "key" and body["has_credential"] is True
    assert "BEGIN OPENSSH PRIVATE KEY" not in response.content.decode()
    assert "private_key" not in body and "credential_encrypted" not in body

    job = ProvisioningJob.objects.get(pk=body["id"])
    assert job.created_by == operator_client.user
    assert job.options["python"] == "python3" and job.options["install_dir"] == "~/.flotilla"
    assert (job.options["packages"], job.options["training"]) == ("index", "none")

    for client in (operator_client, viewer_client):
        listed = client.get(URL).json()["results"]
        detail = client.get(f"{URL}{job.pk}/").json()
        assert listed[0]["id"] == job.pk and detail["steps"][0]["step"] == "queued"
        assert "PRIVATE KEY" not in str(listed) + str(detail)

    event = AuditEvent.objects.get(action="provisioning_job.create")
    assert event.target_id == str(job.pk)
    assert "PRIVATE KEY" not in str(event.data)


def test_viewer_cannot_create_and_bad_input_is_refused(
    board: Board, viewer_client: Any, operator_client: Any
) -> None:
    assert viewer_client.post(URL, _body(board), format="json").status_code == 403

    both = operator_client.post(URL, _body(board, password="x"), format="json")
    assert both.status_code == 400
    assert "exactly one of private_key or password" in both.json()["error"]["message"]

    garbage = operator_client.post(URL, _body(board, private_key="not a key"), format="json")
    assert garbage.status_code == 400
    assert garbage.json()["error"]["code"] == "invalid_private_key"

    relative = operator_client.post(URL, _body(board, install_dir="relative/dir"), format="json")
    assert relative.status_code == 400


def test_package_and_training_options_are_checked(
    board: Board, operator_client: Any, settings: Any, tmp_path: Any
) -> None:
    from fleet.models import ProvisioningJob

    def create(**options: Any) -> Any:
        return operator_client.post(URL, _body(board, **options), format="json")

    for field, value in (("packages", "pip"), ("training", "tensorflow"), ("training", "ort")):
        refused = create(**{field: value})
        assert refused.status_code == 400, refused.content
        assert f'"{value}" is not a valid choice' in str(refused.json()), refused.json()

    settings.PROVISIONING_WHEELHOUSE = ""
    no_wheelhouse = create(packages="wheelhouse")
    assert no_wheelhouse.status_code == 400
    assert no_wheelhouse.json()["error"]["code"] == "wheelhouse_missing"
    assert "PROVISIONING_WHEELHOUSE" in no_wheelhouse.json()["error"]["message"]
    assert create(packages="wheelhouse", wheelhouse="wheels").status_code == 400
    unused = create(packages="index", wheelhouse="/opt/wheels")
    assert unused.status_code == 400 and "only used with packages=wheelhouse" in str(unused.json())
    assert not ProvisioningJob.objects.exists()

    on_board = create(packages="wheelhouse", wheelhouse="/opt/wheels", training="auto")
    assert on_board.status_code == 201, on_board.content
    assert on_board.json()["options"]["wheelhouse"] == "/opt/wheels"
    settings.PROVISIONING_WHEELHOUSE = str(tmp_path)
    uploaded = create(packages="wheelhouse", training="onnxruntime")
    assert uploaded.status_code == 201, uploaded.content
    assert uploaded.json()["options"]["training"] == "onnxruntime"
    assert "wheelhouse" not in uploaded.json()["options"]


def test_the_service_refuses_unknown_options_without_the_api(board: Board, db: Any) -> None:
    from core.api import ServiceError
    from fleet.services.provisioning import provisioning_job_create

    unknown: list[dict[str, Any]] = [{"packages": "conda"}, {"training": "jax"}]
    for options in unknown:
        with pytest.raises(ServiceError) as refused:
            provisioning_job_create(
                actor=None, host=board.host, username=board.username, private_key=board.private_key, **options
            )
        assert refused.value.code == "validation_error" and "use one of" in refused.value.message


def _awaiting_job(board: Board) -> Any:
    from fleet.models import ProvisioningJob

    return ProvisioningJob.objects.create(
        host=board.host,
        port=board.port,
        username=board.username,
        auth_method="key",
        credential_encrypted="x",
        status="awaiting_host_key",
        host_key_type=board.host_key_type,
        host_key_b64=board.host_key_b64,
        host_key_fingerprint=board.host_key_fingerprint,
    )


def test_only_admins_accept_host_keys_and_only_the_offered_one(
    board: Board, operator_client: Any, admin_client_api: Any
) -> None:
    from core.audit.models import AuditEvent
    from fleet.models import KnownHost

    job = _awaiting_job(board)
    url = f"{URL}{job.pk}/accept-host-key/"
    assert operator_client.post(url, {"fingerprint": board.host_key_fingerprint}).status_code == 403

    wrong = admin_client_api.post(url, {"fingerprint": "SHA256:" + "A" * 43})
    assert wrong.status_code == 400
    assert wrong.json()["error"]["code"] == "fingerprint_mismatch"
    assert not KnownHost.objects.exists()

    ok = admin_client_api.post(url, {"fingerprint": board.host_key_fingerprint})
    assert ok.status_code == 200 and ok.json()["status"] == "queued"
    assert AuditEvent.objects.filter(action="provisioning_job.accept_host_key").count() == 1

    again = admin_client_api.post(url, {"fingerprint": board.host_key_fingerprint})
    assert again.status_code == 409


def test_known_hosts_are_listed_and_forgotten_by_admins(
    board: Board, viewer_client: Any, operator_client: Any, admin_client_api: Any
) -> None:
    from core.audit.models import AuditEvent
    from fleet.models import KnownHost

    known = KnownHost.objects.create(
        host=board.host,
        port=board.port,
        key_type=board.host_key_type,
        key_b64=board.host_key_b64,
        fingerprint=board.host_key_fingerprint,
    )
    listed = viewer_client.get("/api/v1/known-hosts/").json()["results"]
    assert [k["fingerprint"] for k in listed] == [board.host_key_fingerprint]
    assert operator_client.delete(f"/api/v1/known-hosts/{known.pk}/").status_code == 403
    assert admin_client_api.delete(f"/api/v1/known-hosts/{known.pk}/").status_code == 204
    assert not KnownHost.objects.exists()
    assert (
        AuditEvent.objects.get(action="known_host.forget").data["fingerprint"] == board.host_key_fingerprint
    )


def test_cancel_wipes_the_credential_and_retry_needs_a_new_one(board: Board, operator_client: Any) -> None:
    from fleet.models import ProvisioningJob

    job_id = operator_client.post(URL, _body(board), format="json").json()["id"]
    cancelled = operator_client.post(f"{URL}{job_id}/cancel/")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert ProvisioningJob.objects.get(pk=job_id).credential_encrypted == ""
    assert operator_client.post(f"{URL}{job_id}/cancel/").status_code == 409

    assert operator_client.post(f"{URL}{job_id}/retry/", {}, format="json").status_code == 400
    retried = operator_client.post(f"{URL}{job_id}/retry/", {"private_key": board.private_key}, format="json")
    assert retried.status_code == 200 and retried.json()["status"] == "queued"
    assert retried.json()["has_credential"] is True
    assert (
        operator_client.post(f"{URL}{job_id}/retry/", {"private_key": board.private_key}).status_code == 409
    )
