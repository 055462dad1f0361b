"""Shadow deployments on the server: the operator API, stages, the heartbeat's shadow field,
metrics accepted for a device's shadow version, and the per-device report."""

from __future__ import annotations

from typing import Any

import pytest
from django.utils import timezone

from core.audit.models import AuditEvent
from core.events import subscribed
from fleet.models import Device, DeviceGroup, MetricSample, Shadow
from tests.fleet.conftest import promote


def _sample(name: str, value: float, version_id: int) -> dict[str, Any]:
    return {"name": name, "value": value, "ts": timezone.now().isoformat(), "version_id": version_id}


@pytest.fixture
def setup(db: Any, make_version: Any, enroll: Any) -> Any:
    """Two boards in group "edge" running v1, one board outside it; v2 is the candidate."""
    v1, v2 = make_version(), make_version()
    group = DeviceGroup.objects.create(name="edge")
    members = [enroll(group=group), enroll(group=group)]
    outsider = enroll()
    for agent in [*members, outsider]:
        Device.objects.filter(pk=agent.device.pk).update(running_version=v1, desired_version=v1)
    return {"v1": v1, "v2": v2, "group": group, "members": members, "outsider": outsider}


def _start(client: Any, **body: Any) -> Any:
    return client.post("/api/v1/shadows/", body, format="json")


def test_start_shadow_for_a_group_reaches_its_members_heartbeats_and_stops(
    operator_client: Any, setup: Any, django_capture_on_commit_callbacks: Any
) -> None:
    v2, group = setup["v2"], setup["group"]
    heard: list[Any] = []
    with (
        subscribed(heard.append, names=["shadow.*"]),
        django_capture_on_commit_callbacks(execute=True),
    ):
        response = _start(operator_client, version=v2.pk, group=group.pk, sample_rate=0.5, max_cpu_percent=20)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["status"] == "running" and body["devices"] == 2 and body["sample_rate"] == 0.5
    assert [e.name for e in heard] == ["shadow.started"]
    assert heard[0].payload["version_id"] == v2.pk and heard[0].payload["devices"] == 2
    assert AuditEvent.objects.filter(action="shadow.start", target_id=str(body["id"])).exists()

    answer = setup["members"][0].heartbeat(seq=1).json()
    shadow = answer["shadow"]
    assert shadow["shadow_id"] == body["id"] and shadow["version_id"] == v2.pk
    assert shadow["sample_rate"] == 0.5 and shadow["max_cpu_percent"] == 20.0
    statement = shadow["artifact"]["statement"]
    assert statement["version_id"] == v2.pk and statement["kind"] == "onnx"
    assert shadow["artifact"]["sha256"] == v2.artifacts.get(kind="onnx").sha256
    # The desired (active) version is untouched: the shadow is never installed as active.
    assert answer["desired"]["version_id"] == setup["v1"].pk
    assert "shadow" not in setup["outsider"].heartbeat(seq=1).json()

    with (
        subscribed(heard.append, names=["shadow.*"]),
        django_capture_on_commit_callbacks(execute=True),
    ):
        stopped = operator_client.post(
            f"/api/v1/shadows/{body['id']}/stop/", {"reason": "enough"}, format="json"
        )
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    assert [e.name for e in heard] == ["shadow.started", "shadow.stopped"]
    assert "shadow" not in setup["members"][0].heartbeat(seq=2).json()
    again = operator_client.post(f"/api/v1/shadows/{body['id']}/stop/", {}, format="json")
    assert again.status_code == 200 and AuditEvent.objects.filter(action="shadow.stop").count() == 1


def test_members_may_download_the_candidates_onnx_graph_only(
    operator_client: Any, setup: Any, make_version: Any
) -> None:
    candidate = make_version(onnx=b"shadow-candidate-graph" * 40, weights=b"shadow-weights" * 10)
    member, outsider = setup["members"][0], setup["outsider"]
    shadow_id = _start(operator_client, version=candidate.pk, group=setup["group"].pk, sample_rate=1).json()[
        "id"
    ]
    onnx_url = member.heartbeat(seq=1).json()["shadow"]["artifact"]["url"].removeprefix("/api/agent/v1/")
    assert member.get(onnx_url).status_code == 200
    assert outsider.get(onnx_url).status_code == 404
    weights = candidate.artifacts.get(kind="weights").sha256
    assert member.get(f"artifacts/{weights}").status_code == 404
    operator_client.post(f"/api/v1/shadows/{shadow_id}/stop/", {}, format="json")
    assert member.get(onnx_url).status_code == 404


def test_a_newer_shadow_takes_a_device_over(operator_client: Any, setup: Any, make_version: Any) -> None:
    v3 = make_version()
    agent = setup["members"][0]
    first = _start(operator_client, version=setup["v2"].pk, group=setup["group"].pk, sample_rate=1)
    second = _start(operator_client, version=v3.pk, device_ids=[str(agent.device.pk)], sample_rate=0.2)
    assert first.status_code == 201 and second.status_code == 201, second.content
    assert agent.heartbeat(seq=1).json()["shadow"]["version_id"] == v3.pk
    assert setup["members"][1].heartbeat(seq=1).json()["shadow"]["version_id"] == setup["v2"].pk


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"sample_rate": -0.1}, "sample_rate"),
        ({"sample_rate": "often"}, "sample_rate"),
        ({}, "sample_rate"),
        ({"sample_rate": 0.5, "max_cpu_percent": 0}, "max_cpu_percent"),
        ({"sample_rate": 0.5, "max_cpu_percent": 250}, "max_cpu_percent"),
        ({"sample_rate": 0.5, "budget_ms": -1}, "budget_ms"),
        ({"sample_rate": 0.5, "tolerance": -1}, "tolerance"),
        ({"sample_rate": 0.5, "device_ids": ["not-a-uuid"]}, "device_ids"),
    ],
)
def test_bad_policies_are_400s(operator_client: Any, setup: Any, body: dict[str, Any], field: str) -> None:
    body = {"version": setup["v2"].pk, "group": setup["group"].pk, **body}
    if "device_ids" in body:
        body.pop("group")
    response = _start(operator_client, **body)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "validation_error" and field in str(error["details"])
    assert not Shadow.objects.exists()


def test_bad_targets_are_400s(operator_client: Any, setup: Any) -> None:
    v2, group = setup["v2"].pk, setup["group"].pk
    member = str(setup["members"][0].device.pk)
    for body in (
        {"version": v2, "sample_rate": 1},  # no target
        {"version": v2, "group": group, "device_ids": [member], "sample_rate": 1},  # both
        {"version": 999_999, "group": group, "sample_rate": 1},  # no such version
        {"version": v2, "device_ids": ["00000000-0000-0000-0000-00000000abcd"], "sample_rate": 1},
    ):
        response = _start(operator_client, **body)
        assert response.status_code == 400, (body, response.content)
        assert response.json()["error"]["code"] == "validation_error"
    empty = DeviceGroup.objects.create(name="empty")
    assert _start(operator_client, version=v2, group=empty.pk, sample_rate=1).status_code == 400
    assert _start(operator_client, version=v2, group=987_654, sample_rate=1).status_code == 404
    assert not Shadow.objects.exists()


def test_stages_gate_shadows_like_deployments(operator_client: Any, setup: Any, make_version: Any) -> None:
    group = setup["group"]
    draft = make_version(stage="draft")
    response = _start(operator_client, version=draft.pk, group=group.pk, sample_rate=1)
    assert response.status_code == 409 and response.json()["error"]["code"] == "version_stage_not_allowed"
    staging = make_version(stage="staging")
    response = _start(operator_client, version=staging.pk, group=group.pk, sample_rate=1)
    assert response.status_code == 409 and response.json()["error"]["code"] == "version_stage_not_allowed"
    member = str(setup["members"][0].device.pk)
    response = _start(operator_client, version=staging.pk, device_ids=[member], sample_rate=1)
    assert response.status_code == 409
    rejected = make_version()
    rejected.metrics = {**(rejected.metrics or {}), "rejected": True}
    rejected.save(update_fields=["metrics"])
    response = _start(operator_client, version=rejected.pk, group=group.pk, sample_rate=1)
    assert response.status_code == 409 and response.json()["error"]["code"] == "version_rejected"
    # A staging candidate may shadow on a canary group, as it may be deployed there.
    DeviceGroup.objects.filter(pk=group.pk).update(canary=True)
    response = _start(operator_client, version=staging.pk, group=group.pk, sample_rate=1)
    assert response.status_code == 201, response.content
    no_onnx = promote(make_version(onnx=None, weights=b"w" * 10, stage="draft"), "production")
    response = _start(operator_client, version=no_onnx.pk, group=group.pk, sample_rate=1)
    assert response.status_code == 409 and response.json()["error"]["code"] == "no_onnx"


def test_viewers_and_strangers_cannot_start_or_stop(
    viewer_client: Any, anon_client: Any, operator_client: Any, setup: Any
) -> None:
    body = {"version": setup["v2"].pk, "group": setup["group"].pk, "sample_rate": 1}
    assert _start(viewer_client, **body).status_code == 403
    assert _start(anon_client, **body).status_code in (401, 403)
    shadow_id = _start(operator_client, **body).json()["id"]
    assert viewer_client.post(f"/api/v1/shadows/{shadow_id}/stop/", {}, format="json").status_code == 403
    assert viewer_client.get(f"/api/v1/shadows/{shadow_id}/").status_code == 200
    assert viewer_client.get("/api/v1/shadows/").json()["results"][0]["id"] == shadow_id


def test_members_report_metrics_for_the_shadow_version_and_the_report_counts_devices(
    operator_client: Any, viewer_client: Any, setup: Any
) -> None:
    v2 = setup["v2"]
    shadow_id = _start(operator_client, version=v2.pk, group=setup["group"].pk, sample_rate=1).json()["id"]
    a, b = setup["members"]
    values = [(a, [1, 1, 1, 0]), (b, [1, 0])]
    for i, (agent, agreement) in enumerate(values):
        samples = [_sample("shadow_agreement", v, v2.pk) for v in agreement]
        samples += [_sample("correct", 1, setup["v1"].pk)]
        samples += [_sample("shadow_latency_ms", 2.0 + i, v2.pk), _sample("shadow_correct", 1 - i, v2.pk)]
        response = agent.post("metrics", {"batch_id": f"s{i}", "samples": samples})
        assert response.status_code == 200, response.content
    # A board that is not in the shadow may not speak for the candidate.
    outsider = setup["outsider"].post(
        "metrics", {"batch_id": "o", "samples": [_sample("shadow_agreement", 1, v2.pk)]}
    )
    assert outsider.status_code == 400 and outsider.json()["error"]["code"] == "version_not_yours"
    # Values outside the metric's range are refused whole.
    bad = a.post("metrics", {"batch_id": "bad", "samples": [_sample("shadow_agreement", 0.5, v2.pk)]})
    assert bad.status_code == 400
    report = viewer_client.get(f"/api/v1/shadows/{shadow_id}/").json()["report"]
    rows = {r["device"]: r for r in report["devices"]}
    assert rows[str(a.device.pk)]["agreement"] == 0.75 and rows[str(a.device.pk)]["agreement_samples"] == 4
    assert rows[str(b.device.pk)]["agreement"] == 0.5 and rows[str(b.device.pk)]["accuracy"] == 0.0
    # Devices are the unit: the median of the per-device means, not of the samples.
    assert report["fleet"]["agreement"] == pytest.approx(0.625) and report["fleet"]["agreement_devices"] == 2
    assert report["fleet"]["latency_ms"] == pytest.approx(2.5) and report["fleet"]["mae"] is None
    # The active version's accuracy on the same devices, beside the candidate's.
    assert rows[str(a.device.pk)]["active_accuracy"] == 1.0 and rows[str(a.device.pk)]["accuracy"] == 1.0
    assert report["fleet"]["active_accuracy"] == 1.0 and report["fleet"]["accuracy"] == pytest.approx(0.5)
    # After the shadow stops, an offline board's buffered samples are still its own.
    operator_client.post(f"/api/v1/shadows/{shadow_id}/stop/", {}, format="json")
    late = a.post("metrics", {"batch_id": "late", "samples": [_sample("shadow_agreement", 1, v2.pk)]})
    assert late.status_code == 200
    assert MetricSample.objects.filter(version=v2, name="shadow_agreement").count() == 7


def test_the_version_page_shows_its_shadows_per_device(
    operator_client: Any, make_user: Any, setup: Any
) -> None:
    from django.test import Client
    from django.urls import reverse

    v2 = setup["v2"]
    shadow_id = _start(operator_client, version=v2.pk, group=setup["group"].pk, sample_rate=0.5).json()["id"]
    a = setup["members"][0]
    samples = [_sample("shadow_agreement", v, v2.pk) for v in (1, 1, 0, 1)]
    assert a.post("metrics", {"batch_id": "p", "samples": samples}).status_code == 200
    browser = Client()
    browser.force_login(make_user("viewer"))
    body = browser.get(reverse("frontend:version", args=[v2.pk])).content.decode()
    assert f'id="shadow-{shadow_id}"' in body and 'id="version-shadows"' in body
    assert "75.0%" in body and a.device.name in body
    quiet = browser.get(reverse("frontend:version", args=[setup["v1"].pk])).content.decode()
    assert "Not shadowed on any board" in quiet


def test_the_list_costs_the_same_queries_whatever_the_number_of_shadows(
    operator_client: Any, viewer_client: Any, setup: Any
) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    body = {"version": setup["v2"].pk, "group": setup["group"].pk, "sample_rate": 1}
    _start(operator_client, **body)
    with CaptureQueriesContext(connection) as one:
        viewer_client.get("/api/v1/shadows/")
    for _ in range(4):
        _start(operator_client, **body)
    with CaptureQueriesContext(connection) as five:
        listed = viewer_client.get("/api/v1/shadows/").json()
    assert len(five.captured_queries) == len(one.captured_queries)
    assert [s["devices"] for s in listed["results"]] == [2] * 5
