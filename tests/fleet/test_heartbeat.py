"""The heartbeat: liveness, reordering, desired state, policy, commands, task providers."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from fleet.models import Deployment, Device, DeviceCommand, DeviceGroup, UpdatePolicy
from fleet.selectors.devices import in_maintenance_window, policy_etag
from fleet.services import heartbeat as heartbeat_service
from fleet.services.devices import devices_mark_offline
from fleet.services.liveness import liveness_flush, liveness_queue
from models_registry.signing import signing_public_key_b64, verify, verify_statement

# Only the fleet routes: these tests do not depend on the state of other apps' URL modules.
pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.fleet.urls")]

UNREACHABLE_CACHE = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": "redis://127.0.0.1:1/0",
        "OPTIONS": {"socket_connect_timeout": 0.2},
    }
}


def test_heartbeat_marks_online_and_stores_state(enroll: Any) -> None:
    agent = enroll()
    response = agent.heartbeat(seq=1, agent_version="1.2.0", state={"charging": True, "local_examples": 40})
    assert response.status_code == 200
    body = response.json()
    assert body["device_id"] == str(agent.device.pk)
    # Absent means empty or none (devices_agent.wire.HeartbeatResponse).
    assert "desired" not in body and "tasks" not in body and "commands" not in body
    assert body["policy"]["name"] == "default" and body["policy"]["download_allowed"] is True
    assert body["in_window"] is True and len(body["policy_etag"]) == 12
    device = agent.refresh()
    assert device.status == "online" and device.last_seen is not None
    assert device.agent_version == "1.2.0"
    assert device.state == {"charging": True, "local_examples": 40}
    assert device.last_seq == 1


def test_reordered_heartbeat_does_not_overwrite_newer_state(enroll: Any) -> None:
    agent = enroll()
    agent.heartbeat(seq=5, state={"idle": True})
    assert agent.heartbeat(seq=4, state={"idle": False}).status_code == 200
    device = agent.refresh()
    assert device.state == {"idle": True} and device.last_seq == 5


def test_unchanged_heartbeat_within_write_interval_costs_one_query(enroll: Any, monkeypatch: Any) -> None:
    # Task providers registered by other apps add their own queries; this measures ours.
    monkeypatch.setattr(heartbeat_service, "_task_providers", [])
    agent = enroll()
    agent.heartbeat(seq=1, state={"idle": True})
    with CaptureQueriesContext(connection) as queries:
        assert agent.heartbeat(seq=2, state={"idle": True}).status_code == 200
    assert len(queries) == 1, [q["sql"] for q in queries.captured_queries]


def test_stale_last_seen_is_refreshed_and_offline_device_comes_back(enroll: Any) -> None:
    agent = enroll()
    agent.heartbeat(seq=1)
    old = timezone.now() - timedelta(minutes=5)
    Device.objects.filter(pk=agent.device.pk).update(last_seen=old, status="offline")
    agent.heartbeat(seq=2)
    device = agent.refresh()
    assert device.status == "online" and device.last_seen > old


def test_desired_state_carries_signed_artifact_refs_and_a_deployment(enroll: Any, make_version: Any) -> None:
    agent = enroll()
    version = make_version(weights=b"weights" * 10)
    Device.objects.filter(pk=agent.device.pk).update(desired_version=version)
    body = agent.heartbeat(seq=1).json()
    desired = body["desired"]
    onnx = version.artifacts.get(kind="onnx")
    assert desired["version_id"] == version.pk and desired["label"] == "digits:v1"
    artifact = dict(desired["artifact"])
    statement, statement_signature = artifact.pop("statement"), artifact.pop("statement_signature")
    assert artifact == {
        "kind": "onnx",
        "url": f"/api/agent/v1/artifacts/{onnx.sha256}",
        "sha256": onnx.sha256,
        "size": onnx.size,
        "signature": onnx.signature,
    }
    # What the signature binds: the version as the registry has it, the kind and the bytes.
    assert statement == {
        "format": "flotilla-artifact/1",
        "family": "digits",
        "family_id": version.family_id,
        "version_id": version.pk,
        "number": 1,
        "variant": "fp32",
        "kind": "onnx",
        "sha256": onnx.sha256,
        "size": onnx.size,
        "expires_at": None,
        "rollback": False,
    }
    assert verify_statement(statement, statement_signature, signing_public_key_b64())
    assert desired["number"] == 1 and "rollback" not in desired
    assert desired["weights"]["kind"] == "weights"
    assert desired["weights"]["statement"]["kind"] == "weights"
    assert verify(
        public_key_b64=signing_public_key_b64(), hex_sha256=onnx.sha256, signature_b64=onnx.signature
    )
    assert len(base64.b64decode(onnx.signature)) == 64
    deployment = Deployment.objects.get(device=agent.device)
    assert desired["deployment_id"] == deployment.pk and deployment.state == "pending"
    # The next heartbeat reuses the open deployment instead of opening another.
    assert agent.heartbeat(seq=2).json()["desired"]["deployment_id"] == deployment.pk
    assert Deployment.objects.filter(device=agent.device).count() == 1


def test_deployment_reported_in_heartbeat_is_recorded(enroll: Any, make_version: Any) -> None:
    agent = enroll()
    version = make_version()
    Device.objects.filter(pk=agent.device.pk).update(desired_version=version)
    deployment_id = agent.heartbeat(seq=1).json()["desired"]["deployment_id"]
    agent.heartbeat(seq=2, deployment={"id": deployment_id, "state": "downloading"})
    assert Deployment.objects.get(pk=deployment_id).state == "downloading"
    assert agent.refresh().deployment_state == "downloading"


def test_policy_from_first_group_with_window_in_its_time_zone(enroll: Any) -> None:
    agent = enroll()
    now_tokyo = timezone.now().astimezone(ZoneInfo("Asia/Tokyo"))
    start = (now_tokyo - timedelta(minutes=30)).strftime("%H:%M")
    end = (now_tokyo + timedelta(minutes=30)).strftime("%H:%M")
    inside = UpdatePolicy.objects.create(
        name="tokyo-now",
        timezone="Asia/Tokyo",
        maintenance_windows=[{"days": list(range(7)), "start": start, "end": end}],
        heartbeat_interval_s=30,
    )
    group = DeviceGroup.objects.create(name="a-group", policy=inside)
    agent.device.groups.add(group)
    body = agent.heartbeat(seq=1).json()
    assert body["policy"]["name"] == "tokyo-now"
    assert body["policy"]["in_maintenance_window"] is True and body["policy"]["download_allowed"] is True
    assert body["heartbeat_interval_s"] == 30


def test_maintenance_windows_cross_midnight_and_respect_days() -> None:
    monday_2330 = datetime(2026, 11, 23, 23, 30, tzinfo=ZoneInfo("UTC"))
    tuesday_0100 = monday_2330 + timedelta(hours=1, minutes=30)
    tuesday_0300 = monday_2330 + timedelta(hours=3, minutes=30)
    windows = [{"days": [0], "start": "23:00", "end": "02:00"}]
    assert in_maintenance_window(windows=windows, tz_name="UTC", now=monday_2330)
    assert in_maintenance_window(windows=windows, tz_name="UTC", now=tuesday_0100)
    assert not in_maintenance_window(windows=windows, tz_name="UTC", now=tuesday_0300)
    # 23:30 UTC Monday is 08:30 Tuesday in Tokyo: outside a Monday-night window there.
    assert not in_maintenance_window(windows=windows, tz_name="Asia/Tokyo", now=monday_2330)
    assert in_maintenance_window(windows=[], tz_name="UTC", now=tuesday_0300)


def test_download_not_allowed_when_artifact_exceeds_policy_limit(enroll: Any, make_version: Any) -> None:
    agent = enroll()
    policy = UpdatePolicy.objects.create(name="small", max_download_bytes=10)
    version = make_version()
    Device.objects.filter(pk=agent.device.pk).update(desired_version=version, policy=policy)
    body = agent.heartbeat(seq=1).json()
    assert body["policy"]["in_maintenance_window"] is True
    assert body["policy"]["download_allowed"] is False


def test_pending_commands_are_delivered_once(enroll: Any, operator_client: Any) -> None:
    agent = enroll()
    response = operator_client.post(
        f"/api/v1/devices/{agent.device.pk}/commands/", {"kind": "diagnostics", "args": {"verbose": True}}
    )
    assert response.status_code == 201
    commands = agent.heartbeat(seq=1).json()["commands"]
    assert commands == [{"id": response.json()["id"], "kind": "diagnostics", "args": {"verbose": True}}]
    assert DeviceCommand.objects.get().status == "sent"
    assert agent.heartbeat(seq=2).json().get("commands", []) == []


def test_registered_task_provider_feeds_tasks(enroll: Any) -> None:
    agent = enroll()
    seen: list[Any] = []

    def provider(device: Device) -> list[Any]:
        seen.append(device.pk)
        return [{"kind": "train", "round_id": 7, "task_url": "/api/agent/v1/rounds/7/task", "deadline": "x"}]

    heartbeat_service.register_task_provider(provider)
    try:
        tasks = agent.heartbeat(seq=1).json()["tasks"]
    finally:
        heartbeat_service._task_providers.remove(provider)
    assert seen == [agent.device.pk] and tasks[0]["round_id"] == 7


def test_tag_selected_group_policy_applies_and_edits_reach_devices(enroll: Any, settings: Any) -> None:
    settings.HEARTBEAT_CACHE_TTL_S = 0  # every heartbeat reads the policy afresh
    agent = enroll(tags=["outdoor"], device_tags_allowed=["outdoor"])
    policy = UpdatePolicy.objects.create(name="outdoor-policy", heartbeat_interval_s=120)
    DeviceGroup.objects.create(name="outdoor", tag_selector=["outdoor"], policy=policy)
    DeviceGroup.objects.create(
        name="zzz-other", tag_selector=["indoor"], policy=UpdatePolicy.objects.create(name="x")
    )
    body = agent.heartbeat(seq=1).json()
    assert body["policy"]["name"] == "outdoor-policy" and body["heartbeat_interval_s"] == 120
    UpdatePolicy.objects.filter(pk=policy.pk).update(heartbeat_interval_s=30)
    assert agent.heartbeat(seq=2).json()["heartbeat_interval_s"] == 30


def test_version_without_onnx_is_not_offered(enroll: Any, make_version: Any) -> None:
    from models_registry.models import Artifact

    agent = enroll()
    version = make_version()
    Artifact.objects.filter(version=version).delete()
    Device.objects.filter(pk=agent.device.pk).update(desired_version=version)
    assert agent.heartbeat(seq=1).json().get("desired") is None
    assert not Deployment.objects.exists()


def test_policy_is_sent_only_when_the_agents_etag_is_stale(enroll: Any, settings: Any) -> None:
    settings.HEARTBEAT_CACHE_TTL_S = 0  # every heartbeat reads the policy afresh
    agent = enroll()
    first = agent.heartbeat(seq=1).json()
    etag = first["policy_etag"]
    assert first["policy"]["name"] == "default"
    same = agent.heartbeat(seq=2, policy_etag=etag).json()
    assert "policy" not in same and same["policy_etag"] == etag and same["in_window"] is True
    # A stale or unknown etag gets the whole policy again.
    assert agent.heartbeat(seq=3, policy_etag="0" * 12).json()["policy"]["name"] == "default"
    # An operator's edit changes the etag: the agent holding the old one gets the new policy.
    policy = UpdatePolicy.objects.create(name="edited", max_download_bytes=1000)
    Device.objects.filter(pk=agent.device.pk).update(policy=policy)
    changed = agent.heartbeat(seq=4, policy_etag=etag).json()
    assert changed["policy_etag"] != etag and changed["policy"]["name"] == "edited"
    new_etag = changed["policy_etag"]
    UpdatePolicy.objects.filter(pk=policy.pk).update(max_download_bytes=2000)
    again = agent.heartbeat(seq=5, policy_etag=new_etag).json()
    assert again["policy_etag"] != new_etag and again["policy"]["max_download_bytes"] == 2000


def test_etag_ignores_the_time_varying_fields_and_window_is_always_sent(enroll: Any) -> None:
    agent = enroll()
    now_utc = timezone.now()
    closed = [
        {
            "days": [],
            "start": (now_utc + timedelta(hours=2)).strftime("%H:%M"),
            "end": (now_utc + timedelta(hours=3)).strftime("%H:%M"),
        }
    ]
    policy = UpdatePolicy.objects.create(name="night", maintenance_windows=closed)
    Device.objects.filter(pk=agent.device.pk).update(policy=policy)
    body = agent.heartbeat(seq=1).json()
    assert body["in_window"] is False and body["policy"]["in_maintenance_window"] is False
    static = {
        k: v for k, v in body["policy"].items() if k not in ("in_maintenance_window", "download_allowed")
    }
    flipped = {**static, "in_maintenance_window": True, "download_allowed": True}
    assert policy_etag(document=flipped) == body["policy_etag"]


def test_heartbeat_answer_is_compact_without_browser_headers(enroll: Any) -> None:
    response = enroll().heartbeat(seq=1)
    assert b", " not in response.content and b'": ' not in response.content
    assert response["Content-Type"] == "application/json"
    for name in (
        "X-Frame-Options",
        "Referrer-Policy",
        "Cross-Origin-Opener-Policy",
        "X-Content-Type-Options",
    ):
        assert name not in response, name


def test_benchmark_views_are_not_mounted_by_default(enroll: Any) -> None:
    assert enroll().post("bench/bare", {}).status_code == 404


def test_last_seen_throttle_never_exceeds_half_the_offline_threshold(enroll: Any, settings: Any) -> None:
    # Without Redis (no liveness buffer) the heartbeat writes last_seen itself, throttled.
    settings.CACHES = UNREACHABLE_CACHE
    settings.OFFLINE_AFTER_MISSED = 1
    agent = enroll()
    policy = UpdatePolicy.objects.create(name="fast", heartbeat_interval_s=5)
    agent.heartbeat(seq=1)
    three_s_ago = timezone.now() - timedelta(seconds=3)
    Device.objects.filter(pk=agent.device.pk).update(last_seen=three_s_ago)
    agent.heartbeat(seq=2)  # default interval 60 s: 3 s is within the 10 s throttle
    assert agent.refresh().last_seen == three_s_ago
    Device.objects.filter(pk=agent.device.pk).update(policy=policy)
    agent.heartbeat(seq=3)  # 5 s x 1 missed: written after 2.5 s
    assert agent.refresh().last_seen > three_s_ago


def test_hot_cache_reuses_a_value_until_it_expires() -> None:
    calls: list[int] = []

    def load() -> int:
        calls.append(1)
        return len(calls)

    assert heartbeat_service.hot_cache(key="test.value", load=load, ttl_s=60) == 1
    assert heartbeat_service.hot_cache(key="test.value", load=load, ttl_s=60) == 1
    assert heartbeat_service.hot_cache(key="test.other", load=load, ttl_s=0) == 2
    assert heartbeat_service.hot_cache(key="test.other", load=load, ttl_s=0) == 3


def test_a_rollback_deployment_is_flagged_and_signed_for_its_device(
    enroll: Any, make_version: Any, settings: Any
) -> None:
    from fleet.services.deployments import deployment_open

    settings.ARTIFACT_STATEMENT_LIFETIME_S = 3600
    agent = enroll()
    v1, v2 = make_version(), make_version()
    Device.objects.filter(pk=agent.device.pk).update(running_version=v2, desired_version=v1)
    plain = agent.heartbeat(seq=1).json()["desired"]
    assert "rollback" not in plain and plain["artifact"]["statement"]["rollback"] is False
    expires_at = plain["artifact"]["statement"]["expires_at"]
    assert timezone.now().timestamp() + 3600 <= expires_at <= timezone.now().timestamp() + 3600 + 901

    heartbeat_service.heartbeat_caches_clear()
    deployment = deployment_open(device=agent.refresh(), version_id=v1.pk, rollback=True)
    assert deployment.pk == plain["deployment_id"]  # the open one, now marked a rollback
    desired = agent.heartbeat(seq=2).json()["desired"]
    assert desired["rollback"] is True and desired["number"] == v1.number < v2.number
    statement = desired["artifact"]["statement"]
    assert statement["rollback"] is True and statement["version_id"] == v1.pk
    assert statement["deployment_id"] == deployment.pk and statement["device_id"] == str(agent.device.pk)
    assert statement["expires_at"] == expires_at
    assert verify_statement(statement, desired["artifact"]["statement_signature"], signing_public_key_b64())
    assert desired["artifact"]["statement_signature"] != plain["artifact"]["statement_signature"]


def test_liveness_write_never_revives_a_device_decommissioned_meanwhile(enroll: Any) -> None:
    agent = enroll()
    agent.heartbeat(seq=1)
    device = agent.refresh()  # as authenticated, before an operator decommissions it
    Device.objects.filter(pk=device.pk).update(status="decommissioned", last_seen=None)
    device.status = "offline"  # the stale copy: the write would flip it online
    heartbeat_service.device_heartbeat(device=device, report={"seq": 2}, with_tasks=False)
    stored = Device.objects.get(pk=device.pk)
    assert stored.status == "decommissioned" and stored.last_seen is None and stored.last_seq == 1


def test_liveness_write_never_overwrites_a_newer_heartbeat_written_meanwhile(enroll: Any) -> None:
    agent = enroll()
    agent.heartbeat(seq=1, state={"idle": True})
    device = agent.refresh()
    agent.heartbeat(seq=3, state={"idle": False})  # another worker, with a newer report
    heartbeat_service.device_heartbeat(
        device=device, report={"seq": 2, "state": {"idle": True}}, with_tasks=False
    )
    stored = Device.objects.get(pk=device.pk)
    assert stored.last_seq == 3 and stored.state == {"idle": False}
    heartbeat_service.device_heartbeat(
        device=agent.refresh(),  # as the next request authenticates it
        report={"seq": 4, "state": {"idle": True}, "agent_version": "2.0.0"},
        with_tasks=False,
    )
    stored = Device.objects.get(pk=device.pk)
    assert stored.last_seq == 4 and stored.state == {"idle": True} and stored.agent_version == "2.0.0"


def _seen_long_ago(agent: Any, minutes: int = 10) -> datetime:
    """Put the device's stored last_seen in the past (it stays online); returns that time.

    What earlier heartbeats left in the liveness buffer is flushed first, so that only
    heartbeats after this call can bring the row forward.
    """
    liveness_flush()
    old = timezone.now() - timedelta(minutes=minutes)
    Device.objects.filter(pk=agent.device.pk).update(last_seen=old)
    return old


def test_a_liveness_only_heartbeat_writes_no_row_and_the_flush_writes_it(
    enroll: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(heartbeat_service, "_task_providers", [])
    agent = enroll()
    agent.heartbeat(seq=1, state={"idle": True})
    old = _seen_long_ago(agent)
    before = timezone.now()
    with CaptureQueriesContext(connection) as queries:
        assert agent.heartbeat(seq=2, state={"idle": True}).status_code == 200
    assert [q["sql"].split()[0] for q in queries.captured_queries] == ["SELECT"]
    assert agent.refresh().last_seen == old
    assert liveness_flush() >= 1
    device = agent.refresh()
    assert before <= device.last_seen <= timezone.now()
    assert device.status == "online" and device.last_seq == 1  # the seq of the last report written


def test_changes_besides_liveness_are_written_at_once(enroll: Any) -> None:
    agent = enroll()
    agent.heartbeat(seq=1, agent_version="1.0.0", state={"idle": True})
    old = _seen_long_ago(agent)
    agent.heartbeat(seq=2, agent_version="1.0.0", state={"idle": False})
    device = agent.refresh()
    assert device.state == {"idle": False} and device.last_seq == 2 and device.last_seen > old
    old = _seen_long_ago(agent)
    agent.heartbeat(seq=3, agent_version="1.1.0")
    device = agent.refresh()
    assert device.agent_version == "1.1.0" and device.last_seq == 3 and device.last_seen > old
    Device.objects.filter(pk=agent.device.pk).update(status="offline", last_seen=old)
    agent.heartbeat(seq=4, agent_version="1.1.0")
    device = agent.refresh()
    assert device.status == "online" and device.last_seen > old


def test_a_board_seen_only_in_the_buffer_is_not_marked_offline(enroll: Any) -> None:
    live, silent = enroll(), enroll()
    for agent in (live, silent):
        agent.heartbeat(seq=1)
        _seen_long_ago(agent)
    live.heartbeat(seq=2)  # buffered only: the row still says ten minutes ago
    assert devices_mark_offline() == 1
    assert live.refresh().status == "online" and silent.refresh().status == "offline"
    assert live.device.last_seen > timezone.now() - timedelta(minutes=1)


def test_without_redis_the_heartbeat_writes_last_seen_itself(enroll: Any, settings: Any) -> None:
    agent = enroll()
    agent.heartbeat(seq=1)
    old = _seen_long_ago(agent)
    settings.CACHES = UNREACHABLE_CACHE
    assert agent.heartbeat(seq=2).status_code == 200
    assert agent.refresh().last_seen > old
    # And the offline marking, unable to read the buffer, marks nobody rather than a live board.
    Device.objects.filter(pk=agent.device.pk).update(last_seen=old)
    assert devices_mark_offline() == 0
    assert agent.refresh().status == "online"


def test_the_flush_only_moves_an_online_row_forward(enroll: Any) -> None:
    from core.ratelimit import redis_client

    ahead, offline, pending = enroll(), enroll(), enroll()
    ahead.heartbeat(seq=1)
    offline.heartbeat(seq=1)
    later = timezone.now() + timedelta(minutes=5)
    Device.objects.filter(pk=ahead.device.pk).update(last_seen=later)
    gone = _seen_long_ago(offline)
    Device.objects.filter(pk=offline.device.pk).update(status="offline")
    pipe = redis_client().pipeline(transaction=False)
    for agent in (ahead, offline, pending):
        liveness_queue(agent.device.pk)(pipe)
    pipe.execute()
    assert liveness_flush() == 0
    assert ahead.refresh().last_seen == later
    assert offline.refresh().last_seen == gone and offline.device.status == "offline"
    assert pending.refresh().last_seen is None and pending.device.status == "pending"


def test_a_flush_the_database_refuses_keeps_the_buffer(enroll: Any, monkeypatch: Any) -> None:
    from fleet.services import liveness

    agent = enroll()
    agent.heartbeat(seq=1)
    old = _seen_long_ago(agent)
    agent.heartbeat(seq=2)

    def refuse(entries: Any) -> int:
        raise RuntimeError("database away")

    monkeypatch.setattr(liveness, "_write", refuse)
    with pytest.raises(RuntimeError):
        liveness_flush()
    assert agent.refresh().last_seen == old
    monkeypatch.undo()
    assert liveness_flush() >= 1
    assert agent.refresh().last_seen > old


def test_the_device_api_builds_no_session_user_or_messages(enroll: Any, client: Any) -> None:
    response = enroll().heartbeat(seq=1)
    assert response.status_code == 200 and not response.cookies
    request = response.wsgi_request
    assert not any(hasattr(request, name) for name in ("session", "user", "_messages"))
    # The dashboard keeps all three.
    page = client.get("/login/")
    assert all(hasattr(page.wsgi_request, name) for name in ("session", "user", "_messages"))
