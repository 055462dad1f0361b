"""Reverting a version everywhere: by an operator, on a failed gate, on a flag during the
watch after its rollout succeeded; the family policy decides revert or alert."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
from django.utils import timezone

from core.audit.models import AuditEvent
from core.events import subscribed
from fleet.models import (
    Deployment,
    Device,
    DeviceGroup,
    Experiment,
    FamilyPolicy,
    MetricSample,
    Rollout,
    VersionDecision,
)
from fleet.services.devices import device_assign_version, device_update
from fleet.services.experiments import experiment_create, experiment_start
from fleet.services.revert import version_revert
from fleet.services.rollouts import rollout_advance, rollout_create, rollout_start
from tests.fleet.rollouts.conftest import add_metrics, report

ONE_WAVE = [{"percent": 100, "soak_s": 0}]
EVENTS = ["version.reverted", "version.revert_recommended"]


def _succeed(f: Any) -> Rollout:
    rollout = rollout_create(
        actor=None, data={"version": f.v2.pk, "target_group": f.group.pk, "waves": ONE_WAVE}
    )
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    for device in f.devices:
        report(device, "active")
    assert rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=1)).action == "succeeded"
    rollout.refresh_from_db()
    return rollout


def _device(name: str, version: Any) -> Device:
    return Device.objects.create(
        name=name, status=Device.Status.ONLINE, running_version=version, desired_version=version
    )


def _everywhere(f: Any) -> dict[str, list[Device]]:
    """v2 reaches devices four ways: the rollout, an experiment, by hand, a group release."""
    _succeed(f)
    by = {"rollout": list(f.devices)}
    lab = DeviceGroup.objects.create(name="lab")
    lab_devices = [_device(f"lab-{i}", f.v1) for i in range(10)]
    lab.static_devices.add(*lab_devices)
    experiment = experiment_create(
        actor=None,
        data={
            "name": "a/b",
            "target_group": lab.pk,
            "arms": [
                {"name": "control", "version_id": f.v1.pk, "share": 0.5},
                {"name": "candidate", "version_id": f.v2.pk, "share": 0.5},
            ],
            "primary_metric": "accuracy",
        },
    )
    experiment_start(experiment_id=experiment.pk, actor=None)
    by["experiment"] = [
        d for d in Device.objects.filter(pk__in=[d.pk for d in lab_devices], desired_version=f.v2)
    ]
    assert by["experiment"], "the candidate arm got no device"
    for device in by["experiment"]:
        report(device, "active")
    solo = _device("solo", f.v1)
    device_assign_version(actor=None, device_id=solo.pk, version_id=f.v2.pk)
    report(solo, "active")
    by["hand"] = [solo]
    # A board running v1 whose tags bring it into the group gets the release, v2.
    f.group.tag_selector = ["edge"]
    f.group.save(update_fields=["tag_selector"])
    joiner = _device("joiner", f.v1)
    device_update(actor=None, device_id=joiner.pk, tags=["edge"])
    report(joiner, "active")
    by["release"] = [joiner]
    # A board that never ran anything else, given v2 by hand: nothing to go back to.
    fresh = Device.objects.create(name="fresh", status=Device.Status.ONLINE)
    device_assign_version(actor=None, device_id=fresh.pk, version_id=f.v2.pk)
    report(fresh, "active")
    by["nothing"] = [fresh]
    for devices in by.values():
        for device in devices:
            device.refresh_from_db()
            assert device.running_version_id == f.v2.pk, device.name
    return by


def _feedback(f: Any, devices: list[Device], *, correct: int = 80, n: int = 100) -> None:
    """0.80 accuracy on each device against 0.95 evaluated: drift_check flags v2."""
    f.v2.metrics = {**(f.v2.metrics or {}), "accuracy": 0.95}
    f.v2.save(update_fields=["metrics"])
    now = timezone.now()
    MetricSample.objects.bulk_create(
        MetricSample(device=d, version=f.v2, name="correct", value=1.0 if i < correct else 0.0, ts=now)
        for d in devices
        for i in range(n)
    )


def _policy(f: Any, **fields: Any) -> None:
    FamilyPolicy.objects.update_or_create(family_id=f.v2.family_id, defaults=fields)


def _assert_reverted(f: Any, by: dict[str, list[Device]], decision: VersionDecision) -> None:
    for how in ("rollout", "experiment", "hand", "release"):
        for device in by[how]:
            device.refresh_from_db()
            assert device.desired_version_id == f.v1.pk, (how, device.name)
            deployment = Deployment.objects.filter(device=device, state="pending").get()
            assert deployment.version_id == f.v1.pk and deployment.rollback, (how, device.name)
    (fresh,) = by["nothing"]
    fresh.refresh_from_db()
    assert fresh.running_version_id == f.v2.pk and fresh.desired_version_id == f.v2.pk
    reverted = sum(len(by[k]) for k in ("rollout", "experiment", "hand", "release"))
    assert decision.devices_reverted == reverted
    assert decision.devices_without_previous == 1
    assert decision.detail["devices_without_previous"] == [str(fresh.pk)]
    # The group goes back to the release it had before the rollout: none.
    assert DeviceGroup.objects.get(pk=f.group.pk).release_version_id is None
    assert Experiment.objects.get().status == "stopped"


def test_a_flag_during_the_watch_reverts_every_device_whichever_way_it_got_there(
    fleet: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from fleet.services.drift import drift_check

    f = fleet(3)
    by = _everywhere(f)
    _policy(f, on_failure="revert")
    _feedback(f, by["rollout"])
    heard: list[Any] = []
    with subscribed(heard.append, names=EVENTS), django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == [f.v2.pk]
    decision = VersionDecision.objects.get()
    assert (decision.action, decision.trigger) == ("reverted", "flag")
    assert decision.metrics["metric"] == "accuracy" and decision.metrics["value"] == 0.8
    assert decision.metrics["reference"] == 0.95
    assert decision.metrics["watched_by_rollout"] == Rollout.objects.get(version=f.v2).pk
    _assert_reverted(f, by, decision)
    assert [e.name for e in heard] == ["version.reverted"]
    assert heard[0].payload["devices_reverted"] == decision.devices_reverted
    assert AuditEvent.objects.filter(action="model_version.revert").count() == 1


def test_alert_only_by_default_moves_no_device(fleet: Any, django_capture_on_commit_callbacks: Any) -> None:
    from fleet.services.drift import drift_check

    f = fleet(3)
    _succeed(f)
    _feedback(f, f.devices)
    deployments = Deployment.objects.count()
    heard: list[Any] = []
    with subscribed(heard.append, names=EVENTS), django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == [f.v2.pk]
    assert Deployment.objects.count() == deployments
    assert all(Device.objects.get(pk=d.pk).desired_version_id == f.v2.pk for d in f.devices)
    decision = VersionDecision.objects.get()
    assert (decision.action, decision.trigger, decision.detail["devices"]) == ("alerted", "flag", 3)
    assert [e.name for e in heard] == ["version.revert_recommended"]
    assert heard[0].payload["devices"] == 3


def test_a_flag_after_the_watch_changes_nothing(fleet: Any, django_capture_on_commit_callbacks: Any) -> None:
    from fleet.services.drift import drift_check

    f = fleet(3)
    rollout = _succeed(f)
    _policy(f, on_failure="revert", watch_s=3600)
    Rollout.objects.filter(pk=rollout.pk).update(finished_at=timezone.now() - timedelta(hours=2))
    _feedback(f, f.devices)
    deployments = Deployment.objects.count()
    with django_capture_on_commit_callbacks(execute=True):
        assert drift_check() == [f.v2.pk]
    assert not VersionDecision.objects.exists()
    assert Deployment.objects.count() == deployments


def test_a_failed_gate_reverts_the_version_beyond_the_rollout(fleet: Any) -> None:
    f = fleet(30)  # the first wave, 10 %, is 3 devices: a gate's minimum
    _policy(f, on_failure="revert")
    solo = _device("solo", f.v1)
    device_assign_version(actor=None, device_id=solo.pk, version_id=f.v2.pk)
    report(solo, "active")
    gates = [{"metric": "latency_p95_ms", "max_increase_pct": 20, "min_samples": 50, "min_devices": 3}]
    rollout = rollout_create(
        actor=None,
        data={
            "version": f.v2.pk,
            "target_group": f.group.pk,
            "waves": [{"percent": 10, "soak_s": 60}, {"percent": 100, "soak_s": 0}],
            "gates": gates,
        },
    )
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    exposed = set(rollout.members.values_list("device_id", flat=True))
    rng = np.random.default_rng(3)
    for device in f.devices:
        if device.pk in exposed:
            report(device, "active")
            add_metrics(device, f.v2, "latency_ms", rng.normal(15, 1, 100), ts=t0 + timedelta(seconds=5))
        else:
            add_metrics(device, f.v1, "latency_ms", rng.normal(10, 1, 60), ts=t0 + timedelta(seconds=5))
    result = rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=20))
    assert result.action == "rolled_back"
    rollout.refresh_from_db()
    assert rollout.status == "rolled_back"
    decision = VersionDecision.objects.get()
    assert (decision.action, decision.trigger) == ("reverted", "gate")
    assert decision.metrics["gates"][0]["metric"] == "latency_p95_ms"
    assert decision.metrics["gates"][0]["outcome"] == "failed"
    assert decision.detail["rollouts_rolled_back"] == [rollout.pk]
    assert decision.devices_reverted == 4 and decision.devices_without_previous == 0
    for pk in [*exposed, solo.pk]:
        device = Device.objects.get(pk=pk)
        assert device.desired_version_id == f.v1.pk
        assert Deployment.objects.filter(device=device, version=f.v1, state="pending", rollback=True).exists()


def test_a_failed_gate_with_the_alert_policy_only_pauses_and_alerts(fleet: Any) -> None:
    f = fleet(30)
    gates = [{"metric": "latency_p95_ms", "max_increase_pct": 20, "min_samples": 50, "min_devices": 3}]
    rollout = rollout_create(
        actor=None,
        data={
            "version": f.v2.pk,
            "target_group": f.group.pk,
            "waves": [{"percent": 10, "soak_s": 60}, {"percent": 100}],
            "gates": gates,
        },
    )
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    exposed = set(rollout.members.values_list("device_id", flat=True))
    rng = np.random.default_rng(3)
    for device in f.devices:
        if device.pk in exposed:
            report(device, "active")
            add_metrics(device, f.v2, "latency_ms", rng.normal(15, 1, 100), ts=t0 + timedelta(seconds=5))
        else:
            add_metrics(device, f.v1, "latency_ms", rng.normal(10, 1, 60), ts=t0 + timedelta(seconds=5))
    assert rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=20)).action == "paused"
    decision = VersionDecision.objects.get()
    assert (decision.action, decision.trigger, decision.detail["devices"]) == ("alerted", "gate", 3)
    assert Device.objects.filter(running_version=f.v2, desired_version=f.v2).count() == 3


def test_an_operator_reverts_by_hand(fleet: Any, django_capture_on_commit_callbacks: Any) -> None:
    f = fleet(3)
    by = _everywhere(f)
    with django_capture_on_commit_callbacks(execute=True):
        decision = version_revert(version_id=f.v2.pk, actor=None, reason="bad in the field")
    assert (decision.action, decision.trigger, decision.reason) == (
        "reverted",
        "operator",
        "bad in the field",
    )
    _assert_reverted(f, by, decision)
    # A second revert finds nothing left on the version but the board with no previous one.
    again = version_revert(version_id=f.v2.pk, actor=None)
    assert (again.devices_reverted, again.devices_without_previous) == (0, 1)


def test_a_device_headed_for_the_version_stops_its_download(fleet: Any) -> None:
    f = fleet(1)
    device = f.devices[0]
    device_assign_version(actor=None, device_id=device.pk, version_id=f.v2.pk)
    decision = version_revert(version_id=f.v2.pk, actor=None)
    device.refresh_from_db()
    assert device.desired_version_id == f.v1.pk and device.running_version_id == f.v1.pk
    assert not Deployment.objects.filter(device=device, state="pending").exists()
    assert decision.devices_reverted == 1 and decision.detail["downloads_stopped"] == 1


# --- the API ------------------------------------------------------------------------------


def test_api_revert_of_a_version_nobody_runs_is_200_with_zero_devices(
    fleet: Any, operator_client: Any
) -> None:
    f = fleet(2)
    r = operator_client.post(
        f"/api/v1/model-versions/{f.v2.pk}/revert/", {"reason": "never mind"}, format="json"
    )
    assert r.status_code == 200, r.content
    body = r.json()
    assert body["devices_reverted"] == 0 and body["devices_without_previous"] == 0
    assert body["action"] == "reverted" and body["trigger"] == "operator" and body["reason"] == "never mind"
    listed = operator_client.get(f"/api/v1/version-decisions/?version={f.v2.pk}").json()
    assert [d["id"] for d in listed["results"]] == [body["id"]]


def test_api_revert_refusals(fleet: Any, operator_client: Any, viewer_client: Any, anon_client: Any) -> None:
    f = fleet(2)
    url = f"/api/v1/model-versions/{f.v2.pk}/revert/"
    assert viewer_client.post(url, {}, format="json").status_code == 403
    assert anon_client.post(url, {}, format="json").status_code in (401, 403)
    missing = operator_client.post("/api/v1/model-versions/999999/revert/", {}, format="json")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    long = operator_client.post(url, {"reason": "x" * 501}, format="json")
    assert long.status_code == 400 and "error" in long.json()
    assert operator_client.get("/api/v1/version-decisions/?version=abc").status_code == 400
    assert not VersionDecision.objects.exists()


def test_api_family_policy(fleet: Any, operator_client: Any, viewer_client: Any, settings: Any) -> None:
    f = fleet(1)
    url = f"/api/v1/models/{f.v2.family_id}/policy/"
    body = viewer_client.get(url).json()
    assert body == {
        "family": f.v2.family_id,
        "on_failure": "alert",
        "watch_s": settings.VERSION_WATCH_S,
        "drift_job": False,
        "drift_job_interval_s": settings.DRIFT_JOB_INTERVAL_S,
        "auto_ship": False,
        "stored": False,
    }
    assert viewer_client.put(url, {"on_failure": "revert"}, format="json").status_code == 403
    r = operator_client.put(url, {"on_failure": "revert", "watch_s": 600, "auto_ship": True}, format="json")
    assert r.status_code == 200, r.content
    assert r.json()["on_failure"] == "revert" and r.json()["watch_s"] == 600 and r.json()["auto_ship"]
    assert r.json()["stored"] and not r.json()["drift_job"]
    bad = operator_client.put(url, {"on_failure": "shrug"}, format="json")
    assert bad.status_code == 400 and "error" in bad.json()
    assert operator_client.put(url, {"watch_s": -1}, format="json").status_code == 400
    assert operator_client.get("/api/v1/models/999999/policy/").status_code == 404
    assert AuditEvent.objects.filter(action="model_family.policy_set").count() == 1


def test_groups_go_back_to_their_previous_release_and_a_new_board_to_it(fleet: Any) -> None:
    from fleet.services.releases import group_release_set

    f = fleet(2)
    group_release_set(actor=None, group_id=f.group.pk, version_id=f.v1.pk)
    _succeed(f)
    assert DeviceGroup.objects.get(pk=f.group.pk).release_version_id == f.v2.pk
    # A board that never ran a model joins the group and gets its release, v2.
    f.group.tag_selector = ["edge"]
    f.group.save(update_fields=["tag_selector"])
    newcomer = Device.objects.create(name="newcomer", status=Device.Status.ONLINE)
    device_update(actor=None, device_id=newcomer.pk, tags=["edge"])
    report(newcomer, "active")
    newcomer.refresh_from_db()
    assert newcomer.running_version_id == f.v2.pk and newcomer.previous_version_id is None
    decision = version_revert(version_id=f.v2.pk, actor=None)
    group = DeviceGroup.objects.get(pk=f.group.pk)
    assert group.release_version_id == f.v1.pk
    assert group.release_changes.first().origin_type == "revert"
    assert decision.detail["groups_restored"] == {str(group.pk): f.v1.pk}
    # Without a previous version of its own, the board goes to its group's previous release.
    newcomer.refresh_from_db()
    assert newcomer.desired_version_id == f.v1.pk
    assert Deployment.objects.filter(
        device=newcomer, version=f.v1, rollback=True, origin_type="revert"
    ).exists()
    assert (decision.devices_reverted, decision.devices_without_previous) == (3, 0)


def test_decommissioned_devices_are_left_alone(fleet: Any) -> None:
    f = fleet(1)
    gone = _device("gone", f.v2)
    Device.objects.filter(pk=gone.pk).update(status=Device.Status.DECOMMISSIONED)
    decision = version_revert(version_id=f.v2.pk, actor=None)
    assert decision.devices_reverted == decision.devices_without_previous == 0
    assert not Deployment.objects.filter(device=gone).exists()


def test_a_reverted_board_is_told_to_roll_back_in_its_heartbeat(
    fleet: Any, enroll: Any, operator_client: Any
) -> None:
    f = fleet(1)
    agent = enroll()
    Device.objects.filter(pk=agent.device.pk).update(
        running_version=f.v2, desired_version=f.v2, previous_version=f.v1
    )
    before = agent.heartbeat(seq=1).json().get("desired") or {}
    assert not before.get("rollback")
    r = operator_client.post(f"/api/v1/model-versions/{f.v2.pk}/revert/", {}, format="json")
    assert r.status_code == 200 and r.json()["devices_reverted"] == 1
    desired = agent.heartbeat(seq=3).json()["desired"]
    assert desired["rollback"] is True and desired["version_id"] == f.v1.pk
    statement = desired["artifact"]["statement"]
    assert statement["rollback"] is True and statement["device_id"] == str(agent.device.pk)


def test_api_ids_out_of_range_are_404_or_400(fleet: Any, operator_client: Any) -> None:
    fleet(1)
    huge = 2**70
    r = operator_client.post(f"/api/v1/model-versions/{huge}/revert/", {}, format="json")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert operator_client.get(f"/api/v1/models/{huge}/policy/").status_code == 404
    assert operator_client.get(f"/api/v1/version-decisions/?family={huge}").status_code == 400
