"""The device API over real HTTP through the production ASGI server (uvicorn) as a process."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_enroll_heartbeat_metrics_and_download_over_http(
    live_stack: Any, transactional_db: Any, make_version: Any
) -> None:
    from django.utils import timezone

    from fleet.models import Device, MetricSample
    from fleet.services.enrollment import enrollment_token_create

    _, token = enrollment_token_create(actor=None, max_uses=1, expires_at=timezone.now() + timedelta(hours=1))
    version = make_version(onnx=b"model-bytes" * 1000)
    with httpx.Client(base_url=live_stack.url, timeout=10) as http:
        enrolled = http.post(
            "/api/agent/v1/enroll", json={"token": token, "name": "live", "hardware": {"cores": 2}}
        )
        assert enrolled.status_code == 200, enrolled.text
        auth = {"Authorization": f"Device {enrolled.json()['secret']}"}
        again = http.post("/api/agent/v1/enroll", json={"token": token, "name": "second", "hardware": {}})
        assert again.status_code == 403 and again.json()["error"]["code"] == "token_exhausted"

        Device.objects.filter(pk=enrolled.json()["device_id"]).update(desired_version=version)
        beat = http.post("/api/agent/v1/heartbeat", json={"seq": 1, "state": {"idle": True}}, headers=auth)
        assert beat.status_code == 200, beat.text
        artifact = beat.json()["desired"]["artifact"]

        part = http.get(artifact["url"], headers={**auth, "Range": "bytes=0-9"})
        assert part.status_code == 206 and part.content == b"model-byte"
        whole = http.get(artifact["url"], headers=auth)
        assert whole.status_code == 200 and len(whole.content) == artifact["size"]

        sample = {"name": "latency_ms", "value": 2.5, "ts": timezone.now().isoformat()}
        sent = http.post("/api/agent/v1/metrics", json={"batch_id": "b1", "samples": [sample]}, headers=auth)
        assert sent.json() == {"accepted": 1, "duplicate": False}
        bad = http.post("/api/agent/v1/heartbeat", content=b"{oops", headers=auth)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "malformed_json"
    assert MetricSample.objects.count() == 1
    assert Device.objects.get().status == "online"


def test_a_board_enrolled_for_a_group_with_a_release_gets_it_on_its_first_heartbeat(
    live_stack: Any, transactional_db: Any, make_version: Any
) -> None:
    from django.utils import timezone

    from fleet.models import Deployment, DeviceGroup
    from fleet.services.enrollment import enrollment_token_create
    from fleet.services.releases import group_release_set

    version = make_version(onnx=b"released-model" * 500)
    group = DeviceGroup.objects.create(name="released-live")
    group_release_set(actor=None, group_id=group.pk, version_id=version.pk, reason="known good")
    _, token = enrollment_token_create(
        actor=None, group=group, max_uses=1, expires_at=timezone.now() + timedelta(hours=1)
    )
    with httpx.Client(base_url=live_stack.url, timeout=10) as http:
        enrolled = http.post("/api/agent/v1/enroll", json={"token": token, "name": "new", "hardware": {}})
        assert enrolled.status_code == 200, enrolled.text
        auth = {"Authorization": f"Device {enrolled.json()['secret']}"}
        beat = http.post("/api/agent/v1/heartbeat", json={"seq": 1}, headers=auth)
        assert beat.status_code == 200, beat.text
        desired = beat.json()["desired"]
    assert desired["version_id"] == version.pk
    deployment = Deployment.objects.get(pk=desired["deployment_id"])
    assert (deployment.origin_type, deployment.origin_id) == ("release", group.pk)
