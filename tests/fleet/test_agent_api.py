"""The rest of the device API: metrics, deployments, commands, artifacts, and bad requests."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from fleet.models import Deployment, DeploymentEvent, Device, DeviceCommand, MetricBatch, MetricSample
from fleet.services.devices import device_decommission
from fleet.services.liveness import liveness_flush

# Only the fleet routes: these tests do not depend on the state of other apps' URL modules.
pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.fleet.urls")]


def _sample(**extra: Any) -> dict[str, Any]:
    return {"name": "latency_ms", "value": 3.5, "ts": timezone.now().isoformat(), **extra}


# --- malformed requests ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ("{not json", "malformed_json"),
        ("[" * 100_000 + "]" * 100_000, "malformed_json"),
        (b"\xff\xfe{}", "malformed_json"),
        ("[1, 2]", "validation_error"),
        ('{"seq": NaN}', "malformed_json"),
        ({"seq": "one"}, "validation_error"),
        ({"seq": -1}, "validation_error"),
        ({"state": {"charging": "yes"}}, "validation_error"),
        ({"state": {"battery_percent": [1]}}, "validation_error"),
        ({"deployment": {"id": 1, "state": "exploded"}}, "validation_error"),
        ({"sent_at": "yesterday"}, "validation_error"),
    ],
)
def test_malformed_heartbeats_are_400_in_the_error_shape(enroll: Any, body: Any, code: str) -> None:
    agent = enroll()
    response = agent.post("heartbeat", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    liveness_flush()  # what the refused request left in the liveness buffer changes nothing
    assert agent.refresh().last_seen is None


def test_oversized_body_is_413(enroll: Any, settings: Any) -> None:
    agent = enroll()
    settings.AGENT_MAX_BODY_BYTES = 1000
    response = agent.post("metrics", {"batch_id": "b", "samples": [_sample()] * 40})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert MetricBatch.objects.count() == 0


def test_wrong_method_is_405_in_the_error_shape(enroll: Any) -> None:
    response = enroll().get("heartbeat")
    assert response.status_code == 405
    assert response.json()["error"]["code"] == "method_not_allowed"


def test_missing_or_wrong_credentials_are_401(client: Any, enroll: Any) -> None:
    enroll()
    for headers in ({}, {"HTTP_AUTHORIZATION": "Device nope"}, {"HTTP_AUTHORIZATION": "Token abc"}):
        response = client.post(
            "/api/agent/v1/heartbeat", data="{}", content_type="application/json", **headers
        )
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "not_authenticated"
        assert response["WWW-Authenticate"] == "Device"


def test_decommissioned_device_is_refused(enroll: Any) -> None:
    agent = enroll()
    assert agent.heartbeat(seq=1).status_code == 200
    device_decommission(actor=None, device_id=agent.device.pk)
    assert agent.heartbeat(seq=2).status_code == 401
    assert agent.refresh().status == "decommissioned"


# --- metrics ---------------------------------------------------------------------------


def test_metrics_batch_is_stored_once(enroll: Any, make_version: Any) -> None:
    agent = enroll()
    version = make_version()
    Device.objects.filter(pk=agent.device.pk).update(running_version=version)
    body = {
        "batch_id": "batch-1",
        "samples": [_sample(), _sample(name="correct", value=1, version_id=version.pk)],
    }
    first = agent.post("metrics", body)
    assert first.status_code == 200 and first.json() == {"accepted": 2, "duplicate": False}
    again = agent.post("metrics", body)
    assert again.status_code == 200 and again.json() == {"accepted": 0, "duplicate": True}
    assert MetricSample.objects.count() == 2
    assert MetricSample.objects.filter(version=version).count() == 1


@pytest.mark.parametrize(
    "samples",
    [
        [],
        [_sample()] * 1001,
        [_sample(name="temperature")],
        [_sample(value=float("inf"))],
        [_sample(value="3")],
        [_sample(value=True)],
        [_sample(ts="2026-01-01T00:00:00")],  # no zone
        [_sample(ts=(timezone.now() + timedelta(days=2)).isoformat())],
        [_sample(), "not an object"],
    ],
)
def test_bad_metric_batches_are_rejected_whole(enroll: Any, samples: list[Any]) -> None:
    agent = enroll()
    body = json.dumps({"batch_id": "b1", "samples": samples}).replace("Infinity", "1e999")
    response = agent.post("metrics", body)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "validation_error"
    assert MetricBatch.objects.count() == 0 and MetricSample.objects.count() == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("correct", -1e12),
        ("correct", 0.5),
        ("correct", 2),
        ("error", 1e6),
        ("error", -1),
        ("confidence", 1.5),
        ("latency_ms", -3),
        ("latency_ms", 1e12),
        ("abs_error", -0.1),
        ("global_accuracy", 7),
        ("cpu_percent", 1e9),
        ("dropped", 0.5),
    ],
)
def test_impossible_metric_values_are_refused_whole(
    enroll: Any, make_version: Any, name: str, value: float
) -> None:
    """A device cannot flag, roll back or hide failures with a number no board can measure."""
    agent = enroll()
    version = make_version()
    Device.objects.filter(pk=agent.device.pk).update(running_version=version)
    body = {"batch_id": "b1", "samples": [_sample(), _sample(name=name, value=value, version_id=version.pk)]}
    response = agent.post("metrics", body)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert error["code"] == "metric_out_of_range" and error["details"]["metric"] == name
    assert MetricBatch.objects.count() == 0 and MetricSample.objects.count() == 0


def test_a_device_reports_only_for_its_own_versions(enroll: Any, make_version: Any) -> None:
    """Metrics for a version the device never had (someone's production version) are refused."""
    from fleet.models import Deployment

    agent, other = enroll(), enroll()
    mine, theirs, earlier, unknown_id = make_version(), make_version(), make_version(), 999_999
    Device.objects.filter(pk=agent.device.pk).update(running_version=mine)
    Device.objects.filter(pk=other.device.pk).update(running_version=theirs)
    for i, version_id in enumerate((theirs.pk, unknown_id)):
        response = agent.post(
            "metrics",
            {"batch_id": f"x{i}", "samples": [_sample(name="correct", value=0, version_id=version_id)]},
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "version_not_yours"
    assert MetricSample.objects.count() == 0
    # A version deployed to it recently still counts (an offline board's buffered samples).
    Deployment.objects.create(device=agent.device, version=earlier, state="rolled_back")
    response = agent.post(
        "metrics", {"batch_id": "ok", "samples": [_sample(name="correct", value=1, version_id=earlier.pk)]}
    )
    assert response.status_code == 200, response.content


def test_a_device_over_its_hourly_cap_is_told_to_come_back(enroll: Any, settings: Any) -> None:
    from django.core.cache import cache

    cache.clear()
    settings.METRICS_MAX_SAMPLES_PER_HOUR = 5
    agent = enroll()
    first = agent.post("metrics", {"batch_id": "a", "samples": [_sample()] * 4})
    assert first.status_code == 200
    over = agent.post("metrics", {"batch_id": "b", "samples": [_sample()] * 2})
    assert over.status_code == 429 and over.json()["error"]["code"] == "rate_limited"
    assert 0 < int(over["Retry-After"]) <= 3601
    # A resend of a stored batch is still answered, and another device has its own budget.
    assert agent.post("metrics", {"batch_id": "a", "samples": [_sample()] * 4}).json()["duplicate"]
    assert enroll().post("metrics", {"batch_id": "b", "samples": [_sample()] * 2}).status_code == 200
    assert MetricSample.objects.count() == 6


def test_batch_id_longer_than_64_is_rejected(enroll: Any) -> None:
    response = enroll().post("metrics", {"batch_id": "x" * 65, "samples": [_sample()]})
    assert response.status_code == 400


# --- deployments -----------------------------------------------------------------------


def _deploying(enroll: Any, make_version: Any) -> tuple[Any, Any, int]:
    agent = enroll()
    old, new = make_version(), make_version()
    Device.objects.filter(pk=agent.device.pk).update(running_version=old, desired_version=new)
    deployment_id = agent.heartbeat(seq=1).json()["desired"]["deployment_id"]
    return agent, (old, new), deployment_id


def test_deployment_walks_to_active_and_sets_running_version(enroll: Any, make_version: Any) -> None:
    agent, (old, new), deployment_id = _deploying(enroll, make_version)
    for state in ("downloading", "verifying", "installing", "health_check", "active"):
        response = agent.post(f"deployments/{deployment_id}/status", {"state": state})
        assert response.status_code == 200 and response.json()["state"] == state
    device = agent.refresh()
    assert (device.running_version_id, device.previous_version_id) == (new.pk, old.pk)
    assert device.deployment_state == "active"
    assert list(
        DeploymentEvent.objects.filter(deployment_id=deployment_id).values_list("state", flat=True)
    ) == [
        "pending",
        "downloading",
        "verifying",
        "installing",
        "health_check",
        "active",
    ]
    # Terminal: no way out, and repeating the same state is harmless.
    closed = agent.post(f"deployments/{deployment_id}/status", {"state": "downloading"})
    assert closed.status_code == 409 and closed.json()["error"]["code"] == "deployment_closed"
    assert agent.post(f"deployments/{deployment_id}/status", {"state": "active"}).status_code == 200
    # The device now runs what it should: the heartbeat asks for nothing new.
    assert agent.heartbeat(seq=2).json()["desired"]["deployment_id"] is None


def test_rolled_back_keeps_running_version_and_stops_asking(enroll: Any, make_version: Any) -> None:
    agent, (old, new), deployment_id = _deploying(enroll, make_version)
    agent.post(f"deployments/{deployment_id}/status", {"state": "health_check"})
    response = agent.post(
        f"deployments/{deployment_id}/status", {"state": "rolled_back", "message": "latency 80 ms > 50 ms"}
    )
    assert response.status_code == 200
    device = agent.refresh()
    assert device.running_version_id == old.pk and device.desired_version_id == old.pk
    assert Deployment.objects.get(pk=deployment_id).error == "latency 80 ms > 50 ms"
    assert Deployment.objects.filter(device=device).count() == 1
    agent.heartbeat(seq=2)
    assert Deployment.objects.filter(device=device).count() == 1


def test_another_devices_deployment_or_command_is_404(enroll: Any, make_version: Any) -> None:
    _, _, deployment_id = _deploying(enroll, make_version)
    owner = Device.objects.get(deployments__id=deployment_id)
    command = DeviceCommand.objects.create(device=owner, kind="restart")
    stranger = enroll()
    response = stranger.post(f"deployments/{deployment_id}/status", {"state": "downloading"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert Deployment.objects.get(pk=deployment_id).state == "pending"
    response = stranger.post(f"commands/{command.pk}/result", {"ok": True, "result": {}})
    assert response.status_code == 404
    assert DeviceCommand.objects.get(pk=command.pk).status == "pending"


def test_bad_deployment_status_body_is_400(enroll: Any, make_version: Any) -> None:
    agent, _, deployment_id = _deploying(enroll, make_version)
    for body in (
        {},
        {"state": "superseded"},
        {"state": "active", "detail": [1]},
        {"state": "active", "message": 5},
    ):
        assert agent.post(f"deployments/{deployment_id}/status", body).status_code == 400
    assert Deployment.objects.get(pk=deployment_id).state == "pending"


# --- commands --------------------------------------------------------------------------


def test_command_result_is_recorded_once(enroll: Any) -> None:
    agent = enroll()
    command = DeviceCommand.objects.create(device=agent.device, kind="diagnostics", status="sent")
    first = agent.post(f"commands/{command.pk}/result", {"ok": True, "result": {"disk_free_mb": 120}})
    assert first.status_code == 200 and first.json()["status"] == "succeeded"
    again = agent.post(f"commands/{command.pk}/result", {"ok": False, "result": {"other": 1}})
    assert again.status_code == 200 and again.json()["status"] == "succeeded"
    command.refresh_from_db()
    assert command.result == {"disk_free_mb": 120} and command.finished_at is not None
    assert agent.post(f"commands/{command.pk}/result", {"ok": "yes", "result": {}}).status_code == 400


# --- artifacts -------------------------------------------------------------------------

CONTENT = bytes(range(256)) * 40  # 10,240 bytes


def _entitled(enroll: Any, make_version: Any) -> tuple[Any, str]:
    agent = enroll()
    version = make_version(onnx=CONTENT)
    Device.objects.filter(pk=agent.device.pk).update(desired_version=version)
    agent.refresh()
    return agent, hashlib.sha256(CONTENT).hexdigest()


def _body(response: Any) -> bytes:
    return b"".join(response.streaming_content)


def test_full_download_with_etag_and_length(enroll: Any, make_version: Any) -> None:
    agent, sha = _entitled(enroll, make_version)
    response = agent.get(f"artifacts/{sha}")
    assert response.status_code == 200
    assert response["ETag"] == f'"{sha}"' and response["Accept-Ranges"] == "bytes"
    assert response["Content-Length"] == str(len(CONTENT))
    assert _body(response) == CONTENT


@pytest.mark.parametrize(
    ("header", "first", "last"),
    [
        ("bytes=0-99", 0, 99),
        ("bytes=10000-", 10000, 10239),
        ("bytes=-100", 10140, 10239),
        ("bytes=10200-99999", 10200, 10239),
    ],
)
def test_range_requests(enroll: Any, make_version: Any, header: str, first: int, last: int) -> None:
    agent, sha = _entitled(enroll, make_version)
    response = agent.get(f"artifacts/{sha}", HTTP_RANGE=header)
    assert response.status_code == 206
    assert response["Content-Range"] == f"bytes {first}-{last}/{len(CONTENT)}"
    assert response["Content-Length"] == str(last - first + 1)
    assert _body(response) == CONTENT[first : last + 1]


@pytest.mark.parametrize("header", ["bytes=10240-", "bytes=20000-30000", "bytes=-0", "bytes=50-10"])
def test_unsatisfiable_range_is_416(enroll: Any, make_version: Any, header: str) -> None:
    agent, sha = _entitled(enroll, make_version)
    response = agent.get(f"artifacts/{sha}", HTTP_RANGE=header)
    assert response.status_code == 416
    assert response["Content-Range"] == f"bytes */{len(CONTENT)}"


def test_if_none_match_is_304(enroll: Any, make_version: Any) -> None:
    agent, sha = _entitled(enroll, make_version)
    response = agent.get(f"artifacts/{sha}", HTTP_IF_NONE_MATCH=f'"{sha}"')
    assert response.status_code == 304 and response["ETag"] == f'"{sha}"'
    assert agent.get(f"artifacts/{sha}", HTTP_IF_NONE_MATCH='"other"').status_code == 200


def test_artifact_of_a_version_not_assigned_is_404(enroll: Any, make_version: Any) -> None:
    _, sha = _entitled(enroll, make_version)
    stranger = enroll()
    response = stranger.get(f"artifacts/{sha}")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    assert stranger.get(f"artifacts/{'0' * 64}").status_code == 404
