"""Stages gate deployment: production goes anywhere, staging only to canary groups, drafts,
archived and rejected versions nowhere; every way in (rollouts, experiments, manual
assignment, the API) says so with a stable code. Promotion to production is for admins."""

from __future__ import annotations

from typing import Any

import pytest

from core.api import ServiceError
from fleet.models import Deployment, Device, DeviceGroup, Experiment, Rollout
from fleet.services.devices import device_assign_version
from fleet.services.experiments import (
    experiment_create,
    experiment_evaluate,
    experiment_promote,
    experiment_start,
)
from fleet.services.rollouts import rollout_create, rollout_start
from models_registry.services import version_promote

WAVES = [{"percent": 100, "soak_s": 0}]


def _rollout(version: Any, **target: Any) -> Rollout:
    return rollout_create(actor=None, data={"version": version.pk, "waves": WAVES, **target})


def _experiment(group: Any, control: Any, candidate: Any) -> Experiment:
    return experiment_create(
        actor=None,
        data={
            "name": "a/b",
            "target_group": group.pk,
            "arms": [
                {"name": "control", "version_id": control.pk, "share": 0.5},
                {"name": "candidate", "version_id": candidate.pk, "share": 0.5},
            ],
        },
    )


def _canary(f: Any, n: int = 3) -> DeviceGroup:
    group = DeviceGroup.objects.create(name="canaries", canary=True)
    for device in f.devices[:n]:
        device.groups.add(group)
    return group


def _refusal(call: Any) -> ServiceError:
    with pytest.raises(ServiceError) as err:
        call()
    return err.value


@pytest.mark.parametrize("stage", ["draft", "staging", "archived"])
def test_a_rollout_to_an_ordinary_group_takes_production_only(
    fleet: Any, make_version: Any, stage: str
) -> None:
    f = fleet(4)
    version = make_version(stage="staging" if stage == "archived" else stage)
    if stage == "archived":
        version_promote(version=version, stage="archived")
    refused = _refusal(lambda: _rollout(version, target_group=f.group.pk))
    assert refused.status_code == 409 and refused.code == "version_stage_not_allowed"
    assert refused.details["stage"] == stage and refused.details["allowed"] == ["production"]
    assert f"is in {stage}" in refused.message and "group edge" in refused.message
    assert not Rollout.objects.exists()
    assert _rollout(f.v2, target_group=f.group.pk).status == "draft"  # v2 is in production


def test_staging_reaches_exactly_a_canary_group(fleet: Any, make_version: Any) -> None:
    f = fleet(6)
    canary = _canary(f)
    staged = make_version(stage="staging")
    rollout = _rollout(staged, target_group=canary.pk)
    rollout_start(rollout_id=rollout.pk, actor=None)
    wanted = {d.pk for d in f.devices[:3]}
    assert set(Device.objects.filter(desired_version=staged).values_list("pk", flat=True)) == wanted
    # Tags or device ids added to a canary group could reach any device: production only.
    for extra in ({"target_tags": ["camera"]}, {"target_device_ids": [str(f.devices[5].pk)]}):
        refused = _refusal(lambda extra=extra: _rollout(staged, target_group=canary.pk, **extra))
        assert refused.code == "version_stage_not_allowed"
        assert refused.details["allowed"] == ["production"] and refused.details["canary"] is False
    refused = _refusal(lambda: _rollout(staged, target_device_ids=[str(f.devices[0].pk)]))
    assert refused.code == "version_stage_not_allowed"
    # A draft does not reach even a canary group.
    draft = make_version(stage="draft")
    refused = _refusal(lambda: _rollout(draft, target_group=canary.pk))
    assert refused.details["allowed"] == ["production", "staging"] and refused.details["stage"] == "draft"


def test_a_rejected_version_is_never_deployed_whatever_its_stage(fleet: Any, make_version: Any) -> None:
    f = fleet(4)
    canary = _canary(f)
    rejected = make_version(stage="production")
    rejected.metrics = {"rejected": True, "accuracy": 0.5}
    rejected.save(update_fields=["metrics"])
    for call in (
        lambda: _rollout(rejected, target_group=canary.pk),
        lambda: _experiment(canary, f.v1, rejected),
        lambda: device_assign_version(actor=None, device_id=f.devices[0].pk, version_id=rejected.pk),
    ):
        refused = _refusal(call)
        assert refused.status_code == 409 and refused.code == "version_rejected"


def test_start_checks_the_stage_again(fleet: Any, make_version: Any) -> None:
    f = fleet(4)
    version = make_version()
    rollout = _rollout(version, target_group=f.group.pk)
    version_promote(version=version, stage="archived")
    refused = _refusal(lambda: rollout_start(rollout_id=rollout.pk, actor=None))
    assert refused.code == "version_stage_not_allowed"
    rollout.refresh_from_db()
    assert rollout.status == "draft" and not Deployment.objects.exists()

    # A canary group's rollout of a staging version stops when the group is no longer canary.
    canary = _canary(f, n=2)
    staged = make_version(stage="staging")
    on_canary = _rollout(staged, target_group=canary.pk)
    DeviceGroup.objects.filter(pk=canary.pk).update(canary=False)
    assert _refusal(lambda: rollout_start(rollout_id=on_canary.pk, actor=None)).code == (
        "version_stage_not_allowed"
    )


def test_every_arm_of_an_experiment_is_checked(fleet: Any, make_version: Any) -> None:
    f = fleet(6)
    staged = make_version(stage="staging")
    refused = _refusal(lambda: _experiment(f.group, f.v1, staged))
    assert refused.code == "version_stage_not_allowed" and refused.message.startswith("arm 1: ")
    refused = _refusal(lambda: _experiment(f.group, staged, f.v1))
    assert refused.message.startswith("arm 0: ")
    assert not Experiment.objects.exists()

    canary = _canary(f, n=6)
    experiment = _experiment(canary, f.v1, staged)
    version_promote(version=staged, stage="draft")  # taken back before the start
    refused = _refusal(lambda: experiment_start(experiment_id=experiment.pk, actor=None))
    assert refused.code == "version_stage_not_allowed" and refused.details["stage"] == "draft"
    experiment.refresh_from_db()
    assert experiment.status == "draft"
    version_promote(version=staged, stage="staging")
    assert experiment_start(experiment_id=experiment.pk, actor=None).status == "running"


def test_a_staging_winner_on_a_canary_group_may_be_rolled_out_there(fleet: Any, make_version: Any) -> None:
    f = fleet(4)
    canary = _canary(f, n=4)
    staged = make_version(stage="staging")
    experiment = _experiment(canary, f.v1, staged)
    experiment_start(experiment_id=experiment.pk, actor=None)
    experiment_evaluate(experiment_id=experiment.pk)
    Experiment.objects.filter(pk=experiment.pk).update(status="completed", winner_arm=1)
    rollout = experiment_promote(experiment_id=experiment.pk, actor=None)
    assert rollout.version_id == staged.pk and rollout.target_group_id == canary.pk


def test_manual_assignment_takes_staging_only_on_a_canary_member(fleet: Any, make_version: Any) -> None:
    f = fleet(4)
    staged, draft = make_version(stage="staging"), make_version(stage="draft")
    plain, static_member, tagged = f.devices[0], f.devices[1], f.devices[2]
    refused = _refusal(lambda: device_assign_version(actor=None, device_id=plain.pk, version_id=staged.pk))
    assert refused.status_code == 409 and refused.code == "version_stage_not_allowed"
    assert refused.details == {
        "version": staged.pk,
        "stage": "staging",
        "allowed": ["production"],
        "target": f"device {plain.name} (in no canary group)",
        "canary": False,
    }
    canary = DeviceGroup.objects.create(name="canaries", canary=True, tag_selector=["early"])
    static_member.groups.add(canary)
    Device.objects.filter(pk=tagged.pk).update(tags=["Early"])
    for device in (static_member, tagged):
        assert device_assign_version(actor=None, device_id=device.pk, version_id=staged.pk) is not None
        assert Device.objects.get(pk=device.pk).desired_version_id == staged.pk
        refused = _refusal(
            lambda device=device: device_assign_version(actor=None, device_id=device.pk, version_id=draft.pk)
        )
        assert refused.details["allowed"] == ["production", "staging"]
    assert device_assign_version(actor=None, device_id=plain.pk, version_id=f.v2.pk) is not None
    # The version a device runs may always be pinned: it installs nothing.
    version_promote(version=f.v1, stage="archived")
    assert device_assign_version(actor=None, device_id=plain.pk, version_id=f.v1.pk) is None
    assert Device.objects.get(pk=plain.pk).desired_version_id == f.v1.pk


def test_the_api_answers_the_stage_refusal(fleet: Any, make_version: Any, operator_client: Any) -> None:
    f = fleet(2)
    draft = make_version(stage="draft")
    device = f.devices[0]
    response = operator_client.post(
        f"/api/v1/devices/{device.pk}/assign-version/", {"version": draft.pk}, format="json"
    )
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "version_stage_not_allowed" and error["details"]["stage"] == "draft"
    assert "production" in error["message"]
    created = operator_client.post(
        "/api/v1/rollouts/",
        {"version": draft.pk, "target_group": f.group.pk, "waves": WAVES},
        format="json",
    )
    assert created.status_code == 409 and created.json()["error"]["code"] == "version_stage_not_allowed"
    experiment = operator_client.post(
        "/api/v1/experiments/",
        {
            "name": "x",
            "target_group": f.group.pk,
            "arms": [
                {"name": "a", "version_id": f.v1.pk, "share": 0.5},
                {"name": "b", "version_id": draft.pk, "share": 0.5},
            ],
        },
        format="json",
    )
    assert experiment.status_code == 409 and experiment.json()["error"]["details"]["stage"] == "draft"


def test_only_admins_mark_a_group_canary(operator_client: Any, admin_client_api: Any, db: Any) -> None:
    refused = operator_client.post("/api/v1/device-groups/", {"name": "early", "canary": True}, format="json")
    assert refused.status_code == 403 and not DeviceGroup.objects.filter(name="early").exists()
    plain = operator_client.post("/api/v1/device-groups/", {"name": "early"}, format="json")
    assert plain.status_code == 201 and plain.json()["canary"] is False
    group_id = plain.json()["id"]
    path = f"/api/v1/device-groups/{group_id}/"
    assert operator_client.patch(path, {"canary": True}, format="json").status_code == 403
    assert admin_client_api.patch(path, {"canary": True}, format="json").json()["canary"] is True
    # Operators still edit a canary group, and may take the flag off (that narrows it).
    assert operator_client.patch(path, {"description": "first boards"}, format="json").status_code == 200
    assert operator_client.patch(path, {"canary": False}, format="json").json()["canary"] is False


def test_promotion_to_production_is_admin_only_in_the_service(make_user: Any, make_version: Any) -> None:
    staged = make_version(stage="staging")
    refused = _refusal(
        lambda: version_promote(version=staged, stage="production", actor=make_user("operator"))
    )
    assert refused.status_code == 403 and refused.code == "admin_required"
    staged.refresh_from_db()
    assert staged.stage == "staging"
    assert version_promote(version=staged, stage="production", actor=make_user("admin")).stage == "production"
