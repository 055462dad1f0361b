"""Operator API of federated jobs: validation, roles, lifecycle actions, rounds, audit."""

from __future__ import annotations

from typing import Any

from tests.training.federated.conftest import Fleet


def _body(fleet: Fleet, **extra: Any) -> dict[str, Any]:
    body = {
        "family": fleet.family.name,
        "base_version": fleet.version.pk,
        "target_group": fleet.group.name,
        "rounds": 3,
        "strategy": "fedavg",
        "codec": "int8",
    }
    body.update(extra)
    return body


def test_create_start_pause_resume_cancel_with_audit(fleet: Fleet, operator_client: Any) -> None:
    from core.audit.models import AuditEvent
    from training.models import FederatedJob

    created = operator_client.post("/api/v1/federated-jobs/", _body(fleet), format="json")
    assert created.status_code == 201, created.content
    job_id = created.json()["id"]
    assert created.json()["status"] == "draft" and created.json()["name"]
    for action, status in (("start", "running"), ("pause", "paused"), ("resume", "running")):
        response = operator_client.post(f"/api/v1/federated-jobs/{job_id}/{action}/")
        assert response.status_code == 200, response.content
        assert response.json()["status"] == status
    again = operator_client.post(f"/api/v1/federated-jobs/{job_id}/start/")
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"
    assert operator_client.post(f"/api/v1/federated-jobs/{job_id}/cancel/").json()["status"] == "cancelled"
    assert FederatedJob.objects.get(pk=job_id).finished_at is not None
    actions = list(
        AuditEvent.objects.filter(target_id=str(job_id), target_type="training.federatedjob").values_list(
            "action", flat=True
        )
    )
    for action in ("create", "start", "pause", "resume", "cancel"):
        assert f"federated_job.{action}" in actions


def test_invalid_configurations_are_refused(fleet: Fleet, operator_client: Any) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"strategy": "fedmagic"}, "strategy"),
        ({"codec": "zip"}, "codec"),
        ({"clients_fraction": 1.5}, "clients_fraction"),
        ({"noise_multiplier": 1.0}, "noise_multiplier"),
        ({"strategy": "krum", "strategy_params": {"bogus": 1}}, "strategy_params"),
        ({"topk_fraction": 0}, "topk_fraction"),
    ]
    for extra, field in cases:
        response = operator_client.post("/api/v1/federated-jobs/", _body(fleet, **extra), format="json")
        assert response.status_code == 400, (extra, response.content)
        error = response.json()["error"]
        assert error["code"] == "validation_error" and field in str(error), (extra, error)


def test_version_of_another_family_is_refused(fleet: Fleet, operator_client: Any, fleet_factory: Any) -> None:
    other = fleet_factory(n_devices=1, name="other")
    response = operator_client.post(
        "/api/v1/federated-jobs/", _body(fleet, base_version=other.version.pk), format="json"
    )
    assert response.status_code == 400 and "base_version" in response.json()["error"]["message"]


def test_viewer_reads_but_cannot_write(fleet: Fleet, viewer_client: Any, operator_client: Any) -> None:
    job_id = operator_client.post("/api/v1/federated-jobs/", _body(fleet), format="json").json()["id"]
    assert viewer_client.get("/api/v1/federated-jobs/").status_code == 200
    assert viewer_client.get(f"/api/v1/federated-jobs/{job_id}/").status_code == 200
    assert viewer_client.post("/api/v1/federated-jobs/", _body(fleet), format="json").status_code == 403
    assert viewer_client.post(f"/api/v1/federated-jobs/{job_id}/start/").status_code == 403


def test_rounds_list_shows_stats_and_accuracy(fleet: Fleet, operator_client: Any) -> None:
    from training import services
    from training.models import FederatedRound

    job_id = operator_client.post("/api/v1/federated-jobs/", _body(fleet), format="json").json()["id"]
    operator_client.post(f"/api/v1/federated-jobs/{job_id}/start/")
    rnd = services.round_open(job_id=job_id)
    FederatedRound.objects.filter(pk=rnd.pk).update(accuracy=0.5, participants=3, bytes_in=123)
    response = operator_client.get(f"/api/v1/federated-jobs/{job_id}/rounds/")
    assert response.status_code == 200
    rows = response.json()["results"]
    assert len(rows) == 1
    assert rows[0]["number"] == 1 and rows[0]["accuracy"] == 0.5 and rows[0]["participants"] == 3
    assert rows[0]["selected_count"] == 3 and rows[0]["status"] == "collecting"
    assert operator_client.get("/api/v1/federated-jobs/999999/rounds/").status_code == 404
