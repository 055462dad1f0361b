"""Operator API: devices, groups, enrollment tokens, policies; roles, audit, query counts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core.audit.models import AuditEvent
from fleet.models import Deployment, Device, DeviceCommand, DeviceGroup, EnrollmentToken, UpdatePolicy
from fleet.services.devices import devices_mark_offline

# Only the fleet routes: these tests do not depend on the state of other apps' URL modules.
pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.fleet.urls")]


def _devices(n: int, **extra: Any) -> list[Device]:
    return Device.objects.bulk_create([Device(name=f"d{i:03d}", **extra) for i in range(n)])


def test_list_query_count_does_not_grow_with_devices(viewer_client: Any, make_version: Any) -> None:
    version = make_version()
    group = DeviceGroup.objects.create(name="g")
    policy = UpdatePolicy.objects.create(name="p")

    def count_for(n: int) -> int:
        Device.objects.all().delete()
        for device in _devices(n, running_version=version, desired_version=version, policy=policy):
            device.groups.add(group)
        with CaptureQueriesContext(connection) as queries:
            response = viewer_client.get("/api/v1/devices/?page_size=100")
        assert response.status_code == 200 and response.json()["count"] == n
        return len(queries)

    assert count_for(5) == count_for(50)


def test_list_filters(viewer_client: Any, make_version: Any) -> None:
    version = make_version()
    a, b, c = _devices(3)
    Device.objects.filter(pk=a.pk).update(status="online", tags=["cam", "site-a"], running_version=version)
    Device.objects.filter(pk=b.pk).update(tags=["site-a"])
    group = DeviceGroup.objects.create(name="cams", tag_selector=["cam"])
    c.groups.add(group)

    def names(query: str) -> list[str]:
        return [d["name"] for d in viewer_client.get(f"/api/v1/devices/?{query}").json()["results"]]

    assert names("status=online") == ["d000"]
    assert names("tag=site-a") == ["d000", "d001"]
    assert names(f"version={version.pk}") == ["d000"]
    assert names("group=cams") == ["d000", "d002"]
    assert names(f"group={group.pk}") == ["d000", "d002"]
    assert names("search=001") == ["d001"]
    members = viewer_client.get(f"/api/v1/device-groups/{group.pk}/devices/").json()["results"]
    assert [d["name"] for d in members] == ["d000", "d002"]


def test_detail_shows_hardware_versions_and_deployments(viewer_client: Any, make_version: Any) -> None:
    version = make_version()
    (device,) = _devices(1, arch="aarch64", cores=4, desired_version=version)
    Deployment.objects.create(device=device, version=version)
    body = viewer_client.get(f"/api/v1/devices/{device.pk}/").json()
    assert body["hardware"]["arch"] == "aarch64" and body["hardware"]["cores"] == 4
    assert body["desired_version"] == {"id": version.pk, "label": version.label}
    assert [d["state"] for d in body["recent_deployments"]] == ["pending"]


def test_viewer_cannot_write(viewer_client: Any) -> None:
    (device,) = _devices(1)
    for method, path, body in [
        ("patch", f"/api/v1/devices/{device.pk}/", {"name": "x"}),
        ("post", f"/api/v1/devices/{device.pk}/commands/", {"kind": "restart"}),
        ("post", "/api/v1/device-groups/", {"name": "g"}),
        ("post", "/api/v1/enrollment-tokens/", {}),
        ("post", "/api/v1/update-policies/", {"name": "p"}),
    ]:
        response = getattr(viewer_client, method)(path, body, format="json")
        assert response.status_code == 403, path
        assert response.json()["error"]["code"] == "permission_denied"
    assert AuditEvent.objects.count() == 0 and DeviceCommand.objects.count() == 0


def test_patch_device_edits_and_audits(operator_client: Any) -> None:
    (device,) = _devices(1)
    group = DeviceGroup.objects.create(name="g")
    policy = UpdatePolicy.objects.create(name="p")
    response = operator_client.patch(
        f"/api/v1/devices/{device.pk}/",
        {"name": "renamed", "tags": ["a", "b"], "groups": [group.pk], "policy": policy.pk},
        format="json",
    )
    assert response.status_code == 200, response.content
    device.refresh_from_db()
    assert (device.name, device.tags, device.policy_id) == ("renamed", ["a", "b"], policy.pk)
    assert list(device.groups.all()) == [group]
    event = AuditEvent.objects.get(action="device.update")
    assert event.target_id == str(device.pk) and event.actor == operator_client.user
    bad = operator_client.patch(f"/api/v1/devices/{device.pk}/", {"tags": ["bad tag"]}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "validation_error"


def test_assign_version_opens_deployment(operator_client: Any, make_version: Any) -> None:
    (device,) = _devices(1)
    version = make_version()
    response = operator_client.post(
        f"/api/v1/devices/{device.pk}/assign-version/", {"version": version.pk}, format="json"
    )
    assert response.status_code == 200, response.content
    deployment = Deployment.objects.get(device=device)
    assert response.json()["deployment_id"] == deployment.pk and deployment.origin_type == "manual"
    assert AuditEvent.objects.filter(action="device.assign_version").count() == 1
    missing = operator_client.post(f"/api/v1/devices/{device.pk}/assign-version/", {"version": 99999})
    assert missing.status_code == 400


def test_an_explicit_rollback_is_marked_on_the_deployment(operator_client: Any, make_version: Any) -> None:
    (device,) = _devices(1)
    old, new = make_version(), make_version()
    Device.objects.filter(pk=device.pk).update(running_version=new, desired_version=new)
    path = f"/api/v1/devices/{device.pk}/assign-version/"
    response = operator_client.post(path, {"version": old.pk, "rollback": True}, format="json")
    assert response.status_code == 200, response.content
    deployment = Deployment.objects.get(pk=response.json()["deployment_id"])
    assert deployment.rollback and deployment.version_id == old.pk
    assert AuditEvent.objects.get(action="device.assign_version").data["rollback"] is True
    # Without the flag a deployment is never a rollback (the board refuses a downgrade).
    plain = operator_client.post(path, {"version": new.pk}, format="json")
    assert plain.status_code == 200 and plain.json()["deployment_id"] is None  # it runs it already
    bad = operator_client.post(path, {"version": old.pk, "rollback": "perhaps"}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "validation_error"


def test_decommission_needs_admin_and_revokes_the_secret(
    operator_client: Any, admin_client_api: Any, enroll: Any
) -> None:
    agent = enroll()
    path = f"/api/v1/devices/{agent.device.pk}/decommission/"
    assert operator_client.post(path).status_code == 403
    response = admin_client_api.post(path)
    assert response.status_code == 200 and response.json()["status"] == "decommissioned"
    assert agent.refresh().secret_hash is None
    assert agent.heartbeat(seq=1).status_code == 401
    assert AuditEvent.objects.filter(action="device.decommission").count() == 1


def test_command_kinds_are_checked(operator_client: Any) -> None:
    (device,) = _devices(1)
    response = operator_client.post(f"/api/v1/devices/{device.pk}/commands/", {"kind": "format_disk"})
    assert response.status_code == 400
    assert DeviceCommand.objects.count() == 0


def test_enrollment_token_shown_once_listed_by_prefix_and_revoked(operator_client: Any) -> None:
    response = operator_client.post(
        "/api/v1/enrollment-tokens/", {"name": "batch", "max_uses": 3, "tags": ["lab"]}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    token = body["token"]
    assert body["agent_command"].startswith("flotilla-agent run --server ")
    # The test server is on plain HTTP, which the agent accepts only when told.
    assert body["agent_command"].endswith(f"--token {token} --allow-insecure-http")
    assert body["prefix"] == token[:8] and body["status"] == "active"
    listed = operator_client.get("/api/v1/enrollment-tokens/").json()["results"]
    assert token not in str(listed) and listed[0]["uses"] == 0
    revoked = operator_client.post(f"/api/v1/enrollment-tokens/{body['id']}/revoke/")
    assert revoked.status_code == 200 and revoked.json()["status"] == "revoked"
    assert EnrollmentToken.objects.get().revoked_at is not None
    actions = set(AuditEvent.objects.values_list("action", flat=True))
    assert {"enrollment_token.create", "enrollment_token.revoke"} <= actions
    assert token not in str(list(AuditEvent.objects.values("data")))


def test_expired_token_creation_refused(operator_client: Any) -> None:
    past = (timezone.now() - timedelta(hours=1)).isoformat()
    response = operator_client.post("/api/v1/enrollment-tokens/", {"expires_at": past}, format="json")
    assert response.status_code == 400


@pytest.mark.parametrize(
    "body",
    [
        {"name": "p", "timezone": "Mars/Olympus"},
        {"name": "p", "maintenance_windows": [{"start": "25:00", "end": "02:00"}]},
        {"name": "p", "maintenance_windows": [{"days": [7], "start": "01:00", "end": "02:00"}]},
        {"name": "p", "maintenance_windows": "nightly"},
        {"name": "p", "max_download_bytes": -1},
        {"name": "p", "health_latency_budget_ms": -5},
    ],
)
def test_policy_validation(operator_client: Any, body: dict[str, Any]) -> None:
    response = operator_client.post("/api/v1/update-policies/", body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "validation_error"
    assert UpdatePolicy.objects.count() == 0


def test_policy_and_group_crud_are_audited(operator_client: Any) -> None:
    policy = operator_client.post(
        "/api/v1/update-policies/",
        {
            "name": "nightly",
            "timezone": "Europe/Berlin",
            "maintenance_windows": [{"days": [0, 1], "start": "23:00", "end": "03:00"}],
        },
        format="json",
    )
    assert policy.status_code == 201, policy.content
    group = operator_client.post(
        "/api/v1/device-groups/",
        {"name": "berlin", "policy": policy.json()["id"], "tag_selector": ["de"]},
        format="json",
    )
    assert group.status_code == 201, group.content
    assert operator_client.delete(f"/api/v1/device-groups/{group.json()['id']}/").status_code == 204
    actions = list(AuditEvent.objects.order_by("id").values_list("action", flat=True))
    assert actions == ["update_policy.create", "device_group.create", "device_group.delete"]


def test_mark_offline_is_one_idempotent_update(settings: Any) -> None:
    settings.HEARTBEAT_INTERVAL_S = 60
    settings.OFFLINE_AFTER_MISSED = 3
    now = timezone.now()
    fast = UpdatePolicy.objects.create(name="fast", heartbeat_interval_s=10)
    fresh, stale, stale_fast, fresh_slow, pending = _devices(5, status="online")
    Device.objects.filter(pk=fresh.pk).update(last_seen=now - timedelta(seconds=100))
    Device.objects.filter(pk=stale.pk).update(last_seen=now - timedelta(seconds=200))
    Device.objects.filter(pk=stale_fast.pk).update(last_seen=now - timedelta(seconds=40), policy=fast)
    Device.objects.filter(pk=fresh_slow.pk).update(last_seen=now - timedelta(seconds=20), policy=fast)
    Device.objects.filter(pk=pending.pk).update(status="pending", last_seen=None)
    assert devices_mark_offline(now=now) == 2
    statuses = dict(Device.objects.values_list("name", "status"))
    assert statuses == {
        "d000": "online",
        "d001": "offline",
        "d002": "offline",
        "d003": "online",
        "d004": "pending",
    }
    assert devices_mark_offline(now=now) == 0


def test_mark_offline_task_runs_the_service() -> None:
    from fleet.tasks.devices import devices_mark_offline_task

    (device,) = _devices(1, status="online")
    Device.objects.filter(pk=device.pk).update(last_seen=timezone.now() - timedelta(days=1))
    assert devices_mark_offline_task.apply().get() == 1
    device.refresh_from_db()
    assert device.status == "offline"
