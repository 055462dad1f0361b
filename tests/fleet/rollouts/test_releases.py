"""Group releases: a succeeded rollout sets one, operators set or clear it, and boards that
join the group later (enrollment, tag or group changes) get it as their desired version."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from core.audit.models import AuditEvent
from core.events import subscribed
from fleet.models import Deployment, Device, DeviceGroup, Experiment, ExperimentAssignment, GroupReleaseChange
from fleet.services.devices import device_update
from fleet.services.releases import group_release_set
from fleet.services.rollouts import rollout_advance, rollout_create, rollout_rollback, rollout_start
from tests.fleet.conftest import promote
from tests.fleet.rollouts.conftest import report

ONE_WAVE = [{"percent": 100, "soak_s": 0}]


def _succeed(f: Any) -> Any:
    rollout = rollout_create(
        actor=None, data={"version": f.v2.pk, "target_group": f.group.pk, "waves": ONE_WAVE}
    )
    t0 = timezone.now()
    rollout_start(rollout_id=rollout.pk, actor=None, now=t0)
    for device in f.devices:
        report(device, "active")
    assert rollout_advance(rollout_id=rollout.pk, now=t0 + timedelta(seconds=1)).action == "succeeded"
    return rollout


def _desired_in_first_heartbeat(agent: Any) -> dict[str, Any] | None:
    response = agent.heartbeat(seq=1)
    assert response.status_code == 200, response.content
    desired: dict[str, Any] | None = response.json().get("desired")
    return desired


def test_succeeded_rollout_sets_the_release_and_a_new_board_gets_it_on_its_first_heartbeat(
    fleet: Any, enroll: Any, django_capture_on_commit_callbacks: Any
) -> None:
    f = fleet(3)
    heard: list[Any] = []
    with (
        subscribed(heard.append, names=["group.release_set"]),
        django_capture_on_commit_callbacks(execute=True),
    ):
        rollout = _succeed(f)
    group = DeviceGroup.objects.get(pk=f.group.pk)
    assert group.release_version_id == f.v2.pk
    assert group.release_set_by == "system" and "succeeded" in group.release_reason
    assert group.release_set_at is not None
    change = GroupReleaseChange.objects.get(group=group)
    assert (change.origin_type, change.origin_id, change.previous_version_id) == ("rollout", rollout.pk, None)
    assert [e.payload["version_id"] for e in heard] == [f.v2.pk]
    assert rollout.decisions.get(action="succeeded").metrics["released_to_group"] == group.pk

    # A board enrolled with a token for the group, through the real HTTP path.
    opened: list[Any] = []
    with (
        subscribed(opened.append, names=["deployment.opened"]),
        django_capture_on_commit_callbacks(execute=True),
    ):
        agent = enroll(group=group)
    desired = _desired_in_first_heartbeat(agent)
    assert desired is not None and desired["version_id"] == f.v2.pk
    deployment = Deployment.objects.get(pk=desired["deployment_id"])
    assert (deployment.origin_type, deployment.origin_id) == ("release", group.pk)
    assert deployment.detail["release"]["trigger"] == "enrollment"
    assert [e.payload["device_id"] for e in opened] == [str(agent.device.pk)]
    assert AuditEvent.objects.filter(action="device.release_applied", target_id=str(agent.device.pk)).exists()


def test_token_tags_that_select_a_group_give_its_release(
    operator_client: Any, make_version: Any, enroll: Any
) -> None:
    version = make_version()
    group = DeviceGroup.objects.create(name="cams", tag_selector=["camera"])
    response = operator_client.post(
        f"/api/v1/device-groups/{group.pk}/release/",
        {"version": version.pk, "reason": "known good"},
        format="json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["release"]["version"]["id"] == version.pk
    assert body["release"]["reason"] == "known good"
    assert body["release"]["set_by"] == operator_client.user.username

    agent = enroll(tags=["camera"], device_tags_allowed=["camera"])
    desired = _desired_in_first_heartbeat(agent)
    assert desired is not None and desired["version_id"] == version.pk
    # A board outside the group gets nothing.
    other = enroll()
    assert _desired_in_first_heartbeat(other) is None

    history = operator_client.get(f"/api/v1/device-groups/{group.pk}/release-history/").json()
    rows = history["results"] if isinstance(history, dict) else history
    assert [r["version"]["id"] for r in rows] == [version.pk]


def test_a_board_that_cannot_run_the_release_keeps_what_it_runs(make_version: Any, enroll: Any) -> None:
    from models_registry.models import Artifact

    version = make_version()
    onnx = Artifact.objects.get(version=version, kind=Artifact.Kind.ONNX)
    group = DeviceGroup.objects.create(name="field")
    group_release_set(actor=None, group_id=group.pk, version_id=version.pk)
    # Its ONNX Runtime predates the graph's opset: it is held back, and the audit says why.
    assert onnx.opset is not None and onnx.opset > 11
    old = enroll(group=group, hardware={"extra": {"onnxruntime": "1.5.0"}})
    assert _desired_in_first_heartbeat(old) is None
    held = AuditEvent.objects.get(action="device.release_held", target_id=str(old.device.pk))
    assert held.data["version"] == version.pk and f"opset {onnx.opset}" in held.data["reason"]
    # Its peer with a current ONNX Runtime gets the release.
    peer = enroll(group=group, hardware={"extra": {"onnxruntime": "1.20.1"}})
    assert _desired_in_first_heartbeat(peer)["version_id"] == version.pk


def test_operator_clears_the_release(operator_client: Any, make_version: Any, enroll: Any) -> None:
    version = make_version()
    group = DeviceGroup.objects.create(name="lab")
    group_release_set(actor=None, group_id=group.pk, version_id=version.pk)
    response = operator_client.post(
        f"/api/v1/device-groups/{group.pk}/release/", {"version": None}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["release"] is None
    assert _desired_in_first_heartbeat(enroll(group=group)) is None
    assert list(GroupReleaseChange.objects.filter(group=group).values_list("version_id", flat=True)) == [
        None,
        version.pk,
    ]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "validation_error"),
        ({"version": "x"}, 400, "validation_error"),
        ({"version": 0}, 400, "validation_error"),
        ({"version": 999999}, 400, "validation_error"),
        ({"version": None, "reason": "r" * 501}, 400, "validation_error"),
    ],
)
def test_bad_release_input_is_a_4xx_in_the_error_shape(
    operator_client: Any, body: dict[str, Any], status: int, code: str
) -> None:
    group = DeviceGroup.objects.create(name="lab")
    response = operator_client.post(f"/api/v1/device-groups/{group.pk}/release/", body, format="json")
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code


def test_release_on_a_missing_group_is_404_and_viewers_may_not_set_it(
    operator_client: Any, viewer_client: Any, make_version: Any
) -> None:
    version = make_version()
    response = operator_client.post(
        "/api/v1/device-groups/999999/release/", {"version": version.pk}, format="json"
    )
    assert response.status_code == 404
    group = DeviceGroup.objects.create(name="lab")
    response = viewer_client.post(
        f"/api/v1/device-groups/{group.pk}/release/", {"version": version.pk}, format="json"
    )
    assert response.status_code == 403
    assert DeviceGroup.objects.get(pk=group.pk).release_version_id is None


def test_stages_gate_the_release(operator_client: Any, make_version: Any, enroll: Any) -> None:
    staging = make_version(stage="staging")
    draft = make_version(stage="draft")
    plain = DeviceGroup.objects.create(name="plain")
    canary = DeviceGroup.objects.create(name="canary", canary=True)
    for group, version, code in (
        (plain, staging, "version_stage_not_allowed"),
        (canary, draft, "version_stage_not_allowed"),
    ):
        response = operator_client.post(
            f"/api/v1/device-groups/{group.pk}/release/", {"version": version.pk}, format="json"
        )
        assert response.status_code == 409, response.content
        assert response.json()["error"]["code"] == code
    response = operator_client.post(
        f"/api/v1/device-groups/{canary.pk}/release/", {"version": staging.pk}, format="json"
    )
    assert response.status_code == 200
    desired = _desired_in_first_heartbeat(enroll(group=canary))
    assert desired is not None and desired["version_id"] == staging.pk

    # A release archived since it was set is skipped, not forced on a joining board.
    from models_registry.models import ModelVersion

    ModelVersion.objects.filter(pk=staging.pk).update(stage="archived")
    assert _desired_in_first_heartbeat(enroll(group=canary)) is None


def test_tag_and_group_changes_give_the_release_of_a_newly_joined_group(fleet: Any) -> None:
    f = fleet(1)
    group = DeviceGroup.objects.create(name="site-b", tag_selector=["site-b"])
    group_release_set(actor=None, group_id=group.pk, version_id=f.v2.pk)
    (board,) = f.add(1, prefix="mover", in_group=False)
    device_update(actor=None, device_id=board.pk, tags=["site-b"])
    board.refresh_from_db()
    assert board.desired_version_id == f.v2.pk
    deployment = Deployment.objects.get(device=board, version=f.v2, state="pending")
    assert deployment.detail["release"]["trigger"] == "groups_changed"

    # An operator pins the board back; editing its name (no group joined) changes nothing.
    Device.objects.filter(pk=board.pk).update(desired_version=f.v1)
    device_update(actor=None, device_id=board.pk, name="renamed")
    assert Device.objects.get(pk=board.pk).desired_version_id == f.v1.pk

    # Joining a static group with a release applies it.
    static = DeviceGroup.objects.create(name="static")
    group_release_set(actor=None, group_id=static.pk, version_id=f.v2.pk)
    (other,) = f.add(1, prefix="static", in_group=False)
    device_update(actor=None, device_id=other.pk, group_ids=[static.pk])
    assert Device.objects.get(pk=other.pk).desired_version_id == f.v2.pk


def test_an_active_rollout_or_running_experiment_comes_before_the_release(
    fleet: Any, make_version: Any
) -> None:
    f = fleet(2)
    v3 = make_version()
    release_group = DeviceGroup.objects.create(name="released", tag_selector=["released"])
    group_release_set(actor=None, group_id=release_group.pk, version_id=v3.pk)

    rollout = rollout_create(
        actor=None, data={"version": f.v2.pk, "target_group": f.group.pk, "waves": ONE_WAVE}
    )
    rollout_start(rollout_id=rollout.pk, actor=None)
    held = f.devices[0]
    device_update(actor=None, device_id=held.pk, tags=["released"])
    assert Device.objects.get(pk=held.pk).desired_version_id == f.v2.pk  # the rollout's, not v3

    (in_arm,) = f.add(1, prefix="arm", in_group=False)
    experiment = Experiment.objects.create(
        name="ab", target_group=f.group, arms=[], status=Experiment.Status.RUNNING
    )
    ExperimentAssignment.objects.create(
        experiment=experiment, device=in_arm, arm=0, version=f.v1, previous_version=f.v1
    )
    device_update(actor=None, device_id=in_arm.pk, tags=["released"])
    assert Device.objects.get(pk=in_arm.pk).desired_version_id == f.v1.pk


def test_rolling_back_a_succeeded_rollout_restores_the_previous_release(fleet: Any) -> None:
    f = fleet(2)
    group_release_set(actor=None, group_id=f.group.pk, version_id=f.v1.pk)
    rollout = _succeed(f)
    assert DeviceGroup.objects.get(pk=f.group.pk).release_version_id == f.v2.pk
    rollout_rollback(rollout_id=rollout.pk, actor=None)
    group = DeviceGroup.objects.get(pk=f.group.pk)
    assert group.release_version_id == f.v1.pk
    assert "rolled back" in group.release_reason


def test_a_staging_release_for_a_plain_group_is_refused_by_the_service(make_version: Any) -> None:
    from core.api import ConflictError

    group = DeviceGroup.objects.create(name="plain")
    version = promote(make_version(stage="draft"), "staging")
    with pytest.raises(ConflictError):
        group_release_set(actor=None, group_id=group.pk, version_id=version.pk)


def test_an_operator_tag_change_through_the_api_gives_the_release(fleet: Any, operator_client: Any) -> None:
    f = fleet(1)
    group = DeviceGroup.objects.create(name="line-4", tag_selector=["line-4"])
    group_release_set(actor=None, group_id=group.pk, version_id=f.v2.pk)
    (board,) = f.add(1, prefix="api", in_group=False)
    response = operator_client.patch(f"/api/v1/devices/{board.pk}/", {"tags": ["line-4"]}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["desired_version"]["id"] == f.v2.pk
    bad = operator_client.patch(f"/api/v1/devices/{board.pk}/", {"tags": ["no spaces"]}, format="json")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "validation_error"
