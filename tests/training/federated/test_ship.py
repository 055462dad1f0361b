"""Shipping a federated job in one call: plan, stages, boards held back, control cohort,
lineage, audit, event; and every refusal with its code."""

from __future__ import annotations

from typing import Any

import pytest

from tests.training.federated.conftest import Fleet, finished_job, make_fleet


@pytest.fixture
def big(db: Any) -> Fleet:
    from fleet.models import DeviceGroup

    f = make_fleet(n_devices=30)
    DeviceGroup.objects.filter(pk=f.group.pk).update(canary=True)
    f.group.refresh_from_db()
    return f


def _pass_shadow(fleet: Fleet, rollout: Any, version: Any) -> None:
    """Feedback from the boards showing the candidate as good as the incumbent in shadow."""
    from datetime import timedelta

    from django.utils import timezone

    from fleet.services.rollouts import rollout_advance
    from tests.fleet.rollouts.conftest import add_metrics, wait_past

    now = timezone.now()
    for device in fleet.devices[:5]:
        add_metrics(device, version, "shadow_correct", [1.0] * 20, ts=now)
        add_metrics(device, fleet.version, "correct", [1.0] * 19 + [0.0], ts=now)
    wait_past(now, 20)
    result = rollout_advance(rollout_id=rollout.pk, now=now + timedelta(seconds=5))
    assert result.action == "shadow_passed", result


def _ship(client: Any, job: Any, **body: Any) -> Any:
    return client.post(f"/api/v1/federated-jobs/{job.pk}/ship/", body, format="json")


def test_ship_to_a_canary_group_starts_a_rollout_with_control_and_lineage(
    big: Fleet, operator_client: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from core.audit.models import AuditEvent
    from core.events import subscribed
    from fleet.models import Device, Rollout, RolloutDevice, Shadow
    from models_registry.models import ModelVersion

    job = finished_job(big)
    heard: list[Any] = []
    with (
        subscribed(heard.append, names=["federated_job.shipped"]),
        django_capture_on_commit_callbacks(execute=True),
    ):
        response = _ship(operator_client, job, waves=[{"percent": 20, "soak_s": 60}, {"percent": 100}])
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["evaluation"] == {
        "kind": "central",
        "metric": "accuracy",
        "value": 0.95,
        "base_version": big.version.pk,
        "base_value": (big.version.metrics or {}).get("accuracy"),
    }
    assert body["round"] == 1 and body["job"] == job.pk
    version = ModelVersion.objects.get(pk=job.best_version_id)
    assert version.stage == "staging" and body["version"]["promoted"] == ["staging"]
    rollout = Rollout.objects.get(pk=body["rollout"]["id"])
    # The rollout starts in shadow on every board that can run it; the waves come after.
    assert body["steps"][0]["status"] == "running" and body["steps"][0]["shadow"] == rollout.shadow_id
    assert rollout.status == "shadow" and rollout.version_id == version.pk
    assert Shadow.objects.get(pk=rollout.shadow_id).members.count() == 30
    assert not RolloutDevice.objects.filter(rollout=rollout).exists()
    _pass_shadow(big, rollout, version)
    rollout.refresh_from_db()
    assert rollout.status == "running"
    assert rollout.origin["federated_job"] == job.pk and rollout.origin["round"] == 1
    assert rollout.control_percent == 20 and body["control"]["devices"] >= 5
    assert body["control"]["devices"] + body["control"]["treated_devices"] == 30
    # Control devices are not in any wave; the lineage runs job -> round -> version -> rollout.
    members = {
        str(d) for d in RolloutDevice.objects.filter(rollout=rollout).values_list("device_id", flat=True)
    }
    assert members and all(Device.objects.get(pk=d).desired_version_id == version.pk for d in members)
    assert version.parent_id == big.version.pk
    shipped = rollout.decisions.get(action="shipped")
    assert shipped.metrics["boards"]["can_run"] == 30 and "job" in shipped.reason
    assert AuditEvent.objects.filter(action="federated_job.ship", target_id=str(job.pk)).exists()
    assert [e.payload["rollout_id"] for e in heard] == [rollout.pk]
    assert heard[0].payload["control_devices"] == body["control"]["devices"]


def test_boards_that_cannot_run_it_are_left_out_with_the_count_and_reason(
    big: Fleet, operator_client: Any
) -> None:
    from fleet.models import Device, Rollout, RolloutDevice

    job = finished_job(big)
    old = big.devices[:3]
    Device.objects.filter(pk__in=[d.pk for d in old]).update(hardware={"onnxruntime": "1.5.0"})
    # A board that says nothing of its runtime, or a newer one, is not left out.
    Device.objects.filter(pk=big.devices[3].pk).update(hardware={"onnxruntime": "1.19.2"})
    response = _ship(operator_client, job, control_percent=0, waves=[{"percent": 100}], shadow=False)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["steps"][0]["status"] == "skipped"
    assert body["boards"]["held_back_count"] == 3 and body["boards"]["can_run"] == 27
    assert body["boards"]["reasons"]["onnxruntime_too_old"]["count"] == 3
    held = {row["device"]: row["reason"] for row in body["held_back"]}
    assert held[str(old[0].pk)] == "onnxruntime_too_old"
    rollout = Rollout.objects.get(pk=body["rollout"]["id"])
    members = set(RolloutDevice.objects.filter(rollout=rollout).values_list("device_id", flat=True))
    assert len(members) == 27 and not {d.pk for d in old} & members
    assert rollout.held_back == {str(d.pk): "onnxruntime_too_old" for d in old}


def test_board_facts_decide_what_can_run() -> None:
    from fleet.rollouts.compat import cannot_run, max_opset

    assert max_opset("1.16.3") == 19 and max_opset("1.5.0") == 11 and max_opset("2.0") is None
    graph = {"opset": 17, "onnx_bytes": 40_000_000}
    assert cannot_run(facts={"hardware": {"onnxruntime": "1.12.1"}}, **graph) == "onnxruntime_too_old"
    assert cannot_run(facts={"hardware": {"onnxruntime": "1.13.0"}}, **graph) == ""
    assert cannot_run(facts={"ram_mb": 100}, **graph) == "insufficient_ram"
    assert cannot_run(facts={"ram_mb": 512}, **graph) == ""
    assert cannot_run(facts={}, **graph) == ""  # facts a board did not report never exclude it
    assert cannot_run(facts={"status": "decommissioned"}, **graph) == "decommissioned"


def test_refused_when_no_board_can_run_it(big: Fleet, operator_client: Any) -> None:
    from fleet.models import Device, Rollout

    job = finished_job(big)
    Device.objects.filter(pk__in=[d.pk for d in big.devices]).update(hardware={"onnxruntime": "1.4.0"})
    response = _ship(operator_client, job)
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "no_compatible_devices" and "30 boards" in error["message"]
    assert not Rollout.objects.exists()


def test_job_without_a_successful_round_is_409(big: Fleet, operator_client: Any) -> None:
    job = finished_job(big, status="failed", rounds_done=0)
    response = _ship(operator_client, job)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "no_successful_round"


def test_job_whose_best_is_its_base_is_409(big: Fleet, operator_client: Any) -> None:
    from training.models import FederatedJob

    job = finished_job(big)
    FederatedJob.objects.filter(pk=job.pk).update(best_version=big.version)
    response = _ship(operator_client, job)
    assert response.status_code == 409 and response.json()["error"]["code"] == "no_improvement"


def test_running_job_is_409_unless_forced(big: Fleet, operator_client: Any) -> None:
    job = finished_job(big, status="running")
    refused = _ship(operator_client, job)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_not_finished"
    forced = _ship(operator_client, job, force=True)
    assert forced.status_code == 201, forced.content
    assert forced.json()["forced"] is True


def test_control_cohort_too_small_is_400_with_the_minimum(big: Fleet, operator_client: Any) -> None:
    from fleet.models import Rollout
    from models_registry.models import ModelVersion

    job = finished_job(big)
    response = _ship(operator_client, job, control_percent=3)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "control_too_small" and error["details"]["minimum"] == 5
    assert "control_percent" in error["message"]
    # One transaction: the promotion made on the way is undone with the rest.
    assert ModelVersion.objects.get(pk=job.best_version_id).stage == "draft"
    assert not Rollout.objects.exists()


def test_unknown_group_is_400_and_viewer_is_403(big: Fleet, operator_client: Any, viewer_client: Any) -> None:
    job = finished_job(big)
    unknown = _ship(operator_client, job, target_group="nowhere")
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "validation_error"
    assert unknown.json()["error"]["details"]["target_group"] == "nowhere"
    assert _ship(viewer_client, job).status_code == 403
    bad_variant = _ship(operator_client, job, variant="recommended")
    assert bad_variant.status_code == 400 and "latency_budget_us" in bad_variant.json()["error"]["message"]


def test_production_group_needs_an_admin(big: Fleet, operator_client: Any, admin_client_api: Any) -> None:
    from fleet.models import DeviceGroup, Rollout
    from models_registry.models import ModelVersion

    job = finished_job(big)
    DeviceGroup.objects.filter(pk=big.group.pk).update(canary=False)
    refused = _ship(operator_client, job)
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "production_promotion_required" and "admin" in error["message"]
    assert ModelVersion.objects.get(pk=job.best_version_id).stage == "draft"
    shipped = _ship(admin_client_api, job)
    assert shipped.status_code == 201, shipped.content
    assert shipped.json()["version"]["promoted"] == ["staging", "production"]
    assert Rollout.objects.get(pk=shipped.json()["rollout"]["id"]).status == "shadow"


def test_recommended_variant_without_variants_ships_as_trained(big: Fleet, operator_client: Any) -> None:
    job = finished_job(big)
    response = _ship(operator_client, job, variant="recommended", latency_budget_us=5000)
    assert response.status_code == 201, response.content
    variant = response.json()["variant"]
    assert variant["requested"] == "recommended" and variant["chosen"] == job.best_version_id
    assert "as trained" in variant["note"]


def test_dashboard_ship_button(big: Fleet, make_user: Any) -> None:
    from django.test import Client

    from fleet.models import Rollout

    job = finished_job(big)
    operator, viewer = Client(), Client()
    operator.force_login(make_user("operator"))
    viewer.force_login(make_user("viewer"))
    page = operator.get(f"/federated/{job.pk}/")
    assert page.status_code == 200
    assert f'action="/federated/{job.pk}/ship"' in page.content.decode()
    assert viewer.post(f"/federated/{job.pk}/ship", {"control_percent": "20"}).status_code == 403
    response = operator.post(f"/federated/{job.pk}/ship", {"control_percent": "20", "variant": "as_trained"})
    rollout = Rollout.objects.get(origin__federated_job=job.pk)
    assert response.status_code == 302 and response["Location"] == f"/rollouts/{rollout.pk}/"
    assert rollout.status == "shadow" and len(rollout.control_device_ids) == 6
    # 10 % of the 24 other boards would be 2, too few to judge: the first wave is 5.
    assert rollout.waves[0] == {"count": 5, "soak_s": 600.0}
    _pass_shadow(big, rollout, rollout.version)
    assert rollout.members.count() == 5
    # The rollout page shows the control cohort and where the rollout came from.
    rollout_page = operator.get(f"/rollouts/{rollout.pk}/").content.decode()
    assert "Against the control cohort" in rollout_page and "shadow_passed" in rollout_page
    assert 'id="shadow-phase"' in rollout_page and 'id="shadow-outcome">passed<' in rollout_page
    assert f"federated job {job.pk}</a>, round 1" in rollout_page
    # The job page lists what it shipped; a refusal comes back as a message on the job page.
    assert rollout.name in operator.get(f"/federated/{job.pk}/").content.decode()
    again = operator.post(f"/federated/{job.pk}/ship", {"control_percent": "20"}, follow=True)
    assert "overlapping" in again.content.decode() or "already in" in again.content.decode()
