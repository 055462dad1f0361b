"""Every page renders for each role; writes are refused below the operator role."""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse

from tests.frontend.conftest import Fleet

pytestmark = pytest.mark.django_db


def page_urls(fleet: Fleet) -> list[str]:
    return [
        reverse("frontend:overview"),
        reverse("frontend:devices"),
        reverse("frontend:devices") + "?status=online&tag=camera&search=board",
        reverse("frontend:devices") + f"?group={fleet.group.pk}&version={fleet.version.pk}",
        reverse("frontend:device", args=[fleet.devices[0].pk]),
        reverse("frontend:models"),
        reverse("frontend:family", args=[fleet.family.pk]),
        reverse("frontend:version", args=[fleet.candidate.pk]),
        reverse("frontend:version", args=[fleet.version.pk]),
        reverse("frontend:rollouts"),
        reverse("frontend:rollout", args=[fleet.rollout.pk]),
        reverse("frontend:experiments"),
        reverse("frontend:experiment", args=[fleet.experiment.pk]),
        reverse("frontend:experiments"),
        reverse("frontend:jobs"),
        reverse("frontend:job", args=[fleet.job.pk]),
        reverse("frontend:provisioning"),
        reverse("frontend:provisioning-job", args=[fleet.provisioning_job.pk]),
        reverse("frontend:enrollment"),
        reverse("frontend:group", args=[fleet.group.pk]),
    ]


def write_urls(fleet: Fleet) -> list[str]:
    return [
        reverse("frontend:device-command", args=[fleet.devices[0].pk]),
        reverse("frontend:enrollment-token-new"),
        reverse("frontend:group-new"),
        reverse("frontend:group-release", args=[fleet.group.pk]),
        reverse("frontend:enrollment-token-revoke", args=[fleet.token.pk]),
        reverse("frontend:version-stage", args=[fleet.candidate.pk]),
        reverse("frontend:version-job", args=[fleet.candidate.pk]),
        reverse("frontend:job-new"),
        reverse("frontend:job-action", args=[fleet.job.pk, "pause"]),
        reverse("frontend:rollout-new"),
        reverse("frontend:rollout-action", args=[fleet.rollout.pk, "pause"]),
        reverse("frontend:experiment-action", args=[fleet.experiment.pk, "stop"]),
        reverse("frontend:experiment-new"),
        reverse("frontend:provisioning-new"),
        reverse("frontend:provisioning-accept", args=[fleet.provisioning_job.pk]),
        reverse("frontend:provisioning-cancel", args=[fleet.provisioning_job.pk]),
    ]


def test_pages_need_sign_in(client: Any, fleet: Fleet) -> None:
    for url in page_urls(fleet):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/"), url


def test_login_page_signs_in(client: Any, make_user: Any) -> None:
    user = make_user("viewer")
    assert client.get("/login/").status_code == 200
    response = client.post("/login/", {"username": user.username, "password": "pw-Flotilla-1"})
    assert response.status_code == 302
    assert client.get("/").status_code == 200
    assert client.post("/logout/").status_code == 302
    assert client.get("/").status_code == 302


def test_a_user_without_role_is_refused(page_client: Any, fleet: Fleet) -> None:
    client = page_client(None)
    assert client.get(reverse("frontend:overview")).status_code == 403


def test_every_page_renders_for_a_viewer_without_write_buttons(page_client: Any, fleet: Fleet) -> None:
    client = page_client("viewer")
    for url in page_urls(fleet):
        response = client.get(url)
        assert response.status_code == 200, url
        body = response.content.decode()
        assert "data-write" not in body, url
        assert "Trust this key" not in body
    # Admin-only pages stay closed, and the nav does not offer them.
    assert client.get(reverse("frontend:audit")).status_code == 403
    assert 'href="/audit/"' not in client.get(reverse("frontend:overview")).content.decode()


def test_every_page_renders_for_an_operator_with_write_buttons(page_client: Any, fleet: Fleet) -> None:
    client = page_client("operator")
    with_writes = {
        reverse("frontend:device", args=[fleet.devices[0].pk]),
        reverse("frontend:version", args=[fleet.candidate.pk]),
        reverse("frontend:rollouts"),
        reverse("frontend:rollout", args=[fleet.rollout.pk]),
        reverse("frontend:experiment", args=[fleet.experiment.pk]),
        reverse("frontend:jobs"),
        reverse("frontend:job", args=[fleet.job.pk]),
        reverse("frontend:provisioning"),
        reverse("frontend:enrollment"),
        reverse("frontend:group", args=[fleet.group.pk]),
    }
    for url in page_urls(fleet):
        response = client.get(url)
        assert response.status_code == 200, url
        if url in with_writes:
            assert "data-write" in response.content.decode(), url
    # Accepting a host key is for admins only.
    page = client.get(reverse("frontend:provisioning-job", args=[fleet.provisioning_job.pk])).content.decode()
    assert "Trust this key" not in page
    assert client.get(reverse("frontend:audit")).status_code == 403


def test_admin_sees_audit_log_and_host_key_action(page_client: Any, fleet: Fleet) -> None:
    client = page_client("admin")
    response = client.get(reverse("frontend:audit"))
    assert response.status_code == 200
    assert "enrollment_token.create" in response.content.decode()
    page = client.get(reverse("frontend:provisioning-job", args=[fleet.provisioning_job.pk])).content.decode()
    assert "Trust this key" in page


def test_viewer_writes_are_refused(page_client: Any, fleet: Fleet) -> None:
    from core.audit.models import AuditEvent
    from fleet.models import DeviceCommand

    client = page_client("viewer")
    before = (AuditEvent.objects.count(), DeviceCommand.objects.count())
    for url in write_urls(fleet):
        response = client.post(url, {"kind": "restart", "stage": "production", "fingerprint": "SHA256:abc"})
        assert response.status_code == 403, url
    assert (AuditEvent.objects.count(), DeviceCommand.objects.count()) == before


def test_operator_cannot_accept_host_keys(page_client: Any, fleet: Fleet) -> None:
    client = page_client("operator")
    url = reverse("frontend:provisioning-accept", args=[fleet.provisioning_job.pk])
    assert client.post(url, {"fingerprint": "SHA256:abc"}).status_code == 403


def test_writes_need_post(page_client: Any, fleet: Fleet) -> None:
    client = page_client("operator")
    assert client.get(reverse("frontend:device-command", args=[fleet.devices[0].pk])).status_code == 405


def test_device_page_shows_history_commands_and_downsampled_charts(page_client: Any, fleet: Fleet) -> None:
    client = page_client("viewer")
    response = client.get(reverse("frontend:device", args=[fleet.devices[0].pk]))
    body = response.content.decode()
    assert "downloading → failed" in body
    assert "diagnostics" in body
    charts = response.context["charts"]
    titles = {c["title"] for c in charts}
    assert {"Inference latency", "Resource use", "Accuracy on labelled feedback"} <= titles
    for chart in charts:
        for series in chart["spec"]["series"]:
            assert len(series["data"]) <= 120
    latency = next(c for c in charts if c["title"] == "Inference latency")
    values = [v for v in latency["spec"]["series"][0]["data"] if v is not None]
    # Samples are 10..14 ms: every averaged slot lies in that range.
    assert values and all(10.0 <= v <= 14.0 for v in values)


def test_version_page_draws_the_evaluation_report(page_client: Any, fleet: Fleet) -> None:
    client = page_client("viewer")
    response = client.get(reverse("frontend:version", args=[fleet.candidate.pk]))
    body = response.content.decode()
    assert 'id="confusion"' in body
    evaluation = response.context["evaluation"]
    assert [cell["count"] for cell in evaluation["heat"][1]] == [1, 8, 1]
    # Class 1 has no ROC curve; the chart holds class 0, class 2 and the chance line.
    labels = [s["label"] for s in evaluation["roc"]["series"]]
    assert labels == ["class 0 (AUC 0.950)", "class 2 (AUC 0.500)", "chance"]
    assert "90.0%" in body
    # Lineage: v1 is the parent of v2.
    assert "digits:v1" in body


def test_rollout_page_shows_waves_gates_and_decisions(page_client: Any, fleet: Fleet) -> None:
    client = page_client("viewer")
    response = client.get(reverse("frontend:rollout", args=[fleet.rollout.pk]))
    waves = response.context["waves"]
    assert [w["phase"] for w in waves] == ["current", "waiting"]
    assert waves[0]["active"] == 1 and waves[0]["failed"] == 1
    body = response.content.decode()
    assert "wave 1 opened" in body and "latency_p95_ms" in body


def test_job_page_lists_rounds_participants_and_dropped_devices(page_client: Any, fleet: Fleet) -> None:
    client = page_client("viewer")
    response = client.get(reverse("frontend:job", args=[fleet.job.pk]))
    participants = response.context["participants"]
    assert participants["round"].number == 2
    assert [u["update"].status for u in participants["updates"]] == ["accepted", "rejected"]
    assert [d.pk for d in participants["dropped"]] == [fleet.devices[2].pk]
    assert response.context["charts"][0]["spec"]["labels"] == ["1", "2"]
    assert "non_finite" in response.content.decode()


def test_enrollment_token_is_shown_once(page_client: Any, fleet: Fleet) -> None:
    from fleet.models import EnrollmentToken

    client = page_client("operator")
    response = client.post(
        reverse("frontend:enrollment-token-new"),
        {
            "name": "dock",
            "group": fleet.group.pk,
            "tags": "dock, east",
            "max_uses": "5",
            "expires_hours": "2",
        },
    )
    assert response.status_code == 302
    token = EnrollmentToken.objects.get(name="dock")
    assert token.tags == ["dock", "east"] and token.max_uses == 5 and token.group == fleet.group
    first = client.get(reverse("frontend:enrollment")).content.decode()
    assert (
        'id="new-token-command"' in first and "flotilla-agent run --server http://testserver --token" in first
    )
    assert token.prefix in first
    second = client.get(reverse("frontend:enrollment")).content.decode()
    assert 'id="new-token-command"' not in second


def test_operator_command_and_stage_change_go_through_services(page_client: Any, fleet: Fleet) -> None:
    from core.audit.models import AuditEvent
    from fleet.models import DeviceCommand

    client = page_client("operator")
    device = fleet.devices[0]
    client.post(reverse("frontend:device-command", args=[device.pk]), {"kind": "restart"})
    assert DeviceCommand.objects.filter(device=device, kind="restart").exists()
    response = client.post(reverse("frontend:device-command", args=[device.pk]), {"kind": "format-disk"})
    assert response.status_code == 302
    assert not DeviceCommand.objects.filter(kind="format-disk").exists()
    client.post(reverse("frontend:version-stage", args=[fleet.candidate.pk]), {"stage": "archived"})
    fleet.candidate.refresh_from_db()
    assert fleet.candidate.stage == "archived"
    event = AuditEvent.objects.filter(action="model_version.promote").order_by("-id").first()
    assert event is not None and event.data["to"] == "archived"


def test_promotion_to_production_from_the_dashboard_is_for_admins(page_client: Any, fleet: Fleet) -> None:
    from core.audit.models import AuditEvent

    url = reverse("frontend:version-stage", args=[fleet.candidate.pk])
    page = reverse("frontend:version", args=[fleet.candidate.pk])
    operator = page_client("operator")
    shown = operator.get(page).content.decode()
    # The operator sees staging's other moves but no production button, and why.
    assert 'value="production"' not in shown and 'value="archived"' in shown
    assert 'id="production-needs-admin"' in shown
    before = AuditEvent.objects.filter(action="model_version.promote").count()
    refused = operator.post(url, {"stage": "production"})
    assert refused.status_code == 403
    fleet.candidate.refresh_from_db()
    assert fleet.candidate.stage == "staging"
    assert AuditEvent.objects.filter(action="model_version.promote").count() == before

    admin = page_client("admin")
    assert 'value="production"' in admin.get(page).content.decode()
    assert admin.post(url, {"stage": "production"}).status_code == 302
    fleet.candidate.refresh_from_db()
    assert fleet.candidate.stage == "production"
    event = AuditEvent.objects.filter(action="model_version.promote").order_by("-id").first()
    assert event is not None and event.data["to"] == "production"


def test_rollout_pause_from_the_dashboard(page_client: Any, fleet: Fleet) -> None:
    client = page_client("operator")
    client.post(reverse("frontend:rollout-action", args=[fleet.rollout.pk, "pause"]))
    fleet.rollout.refresh_from_db()
    assert fleet.rollout.status == "paused"


def test_htmx_region_refresh_returns_the_same_page(page_client: Any, fleet: Fleet) -> None:
    client = page_client("viewer")
    response = client.get(reverse("frontend:devices"), HTTP_HX_REQUEST="true")
    assert response.status_code == 200
    assert 'id="device-table"' in response.content.decode()


def test_operator_queues_a_registry_job(page_client: Any, fleet: Fleet) -> None:
    from config.demo.seed import digits_datasets
    from models_registry.models import ModelJob

    client = page_client("operator")
    url = reverse("frontend:version-job", args=[fleet.candidate.pk])
    client.post(url, {"kind": "optimise", "optimisation": "no-such-thing"})
    assert not ModelJob.objects.exists()
    # Without a test set to judge the variant on, the page says so and queues nothing.
    refused = client.post(url, {"kind": "optimise", "optimisation": "int8_dynamic"}, follow=True)
    assert not ModelJob.objects.exists() and "test set" in refused.content.decode()
    digits_datasets(family=fleet.candidate.family)
    client.post(url, {"kind": "optimise", "optimisation": "int8_dynamic"})
    job = ModelJob.objects.get()
    assert job.kind == "optimise" and job.params["kind"] == "int8_dynamic"
    page = client.get(reverse("frontend:version", args=[fleet.candidate.pk])).content.decode()
    assert 'id="model-jobs"' in page and 'hx-trigger="every 3s"' in page


def test_experiment_page_shows_intervals_and_the_winner(page_client: Any, fleet: Fleet) -> None:
    client = page_client("operator")
    body = client.get(reverse("frontend:experiment", args=[fleet.experiment.pk])).content.decode()
    assert "[0.0110, 0.0490]" in body
    assert "candidate wins on accuracy" in body
    assert "Stop" in body and "data-write" in body


def test_operator_creates_an_experiment(page_client: Any, fleet: Fleet) -> None:
    from fleet.models import DeviceGroup, Experiment

    client = page_client("operator")
    form = {
        "name": "v1 vs v2 again",
        "target_group": fleet.group.pk,
        "control_version": fleet.version.pk,
        "candidate_version": fleet.candidate.pk,
        "candidate_share": "0.3",
        "primary_metric": "latency",
        "min_devices_per_arm": "4",
        "min_samples_per_device": "25",
    }
    # The candidate is in staging: only a canary group may try it.
    refused = client.post(reverse("frontend:experiment-new"), form, follow=True)
    assert "takes versions in production only" in refused.content.decode()
    assert not Experiment.objects.filter(name="v1 vs v2 again").exists()
    DeviceGroup.objects.filter(pk=fleet.group.pk).update(canary=True)
    response = client.post(reverse("frontend:experiment-new"), form)
    created = Experiment.objects.get(name="v1 vs v2 again")
    assert response["Location"] == reverse("frontend:experiment", args=[created.pk])
    assert [a["share"] for a in created.arms] == [0.7, 0.3]
    assert created.primary_metric == "latency" and created.status == "draft"
    assert (created.min_devices_per_arm, created.min_samples_per_device) == (4, 25)


def test_operator_creates_a_group_with_the_api_validation(page_client: Any, fleet: Fleet) -> None:
    from core.audit.models import AuditEvent
    from fleet.models import DeviceGroup

    client = page_client("operator")
    client.post(reverse("frontend:group-new"), {"name": "line-4", "tag_selector": "camera, line-4"})
    group = DeviceGroup.objects.get(name="line-4")
    assert group.tag_selector == ["camera", "line-4"]
    assert AuditEvent.objects.filter(action="device_group.create", target_id=str(group.pk)).exists()
    client.post(reverse("frontend:group-new"), {"name": "not a slug!"})
    assert not DeviceGroup.objects.filter(name="not a slug!").exists()
    assert not group.canary


def test_only_admins_mark_a_group_canary_from_the_dashboard(page_client: Any, fleet: Fleet) -> None:
    from fleet.models import DeviceGroup

    operator = page_client("operator")
    assert 'name="canary"' not in operator.get(reverse("frontend:enrollment")).content.decode()
    refused = operator.post(reverse("frontend:group-new"), {"name": "canaries", "canary": "on"})
    assert refused.status_code == 403 and not DeviceGroup.objects.filter(name="canaries").exists()
    admin = page_client("admin")
    assert 'name="canary"' in admin.get(reverse("frontend:enrollment")).content.decode()
    admin.post(reverse("frontend:group-new"), {"name": "canaries", "canary": "on"})
    assert DeviceGroup.objects.get(name="canaries").canary
    listed = operator.get(reverse("frontend:enrollment")).content.decode()
    assert "staging or production" in listed


def test_operator_sets_and_clears_a_group_release_from_the_group_page(page_client: Any, fleet: Fleet) -> None:
    from core.audit.models import AuditEvent
    from fleet.models import DeviceGroup

    client = page_client("operator")
    url = reverse("frontend:group-release", args=[fleet.group.pk])
    response = client.post(url, {"version": fleet.version.pk, "reason": "known good"})
    assert response.status_code == 302
    group = DeviceGroup.objects.get(pk=fleet.group.pk)
    assert group.release_version_id == fleet.version.pk and group.release_reason == "known good"
    assert group.release_set_by == client.get(reverse("frontend:overview")).context["user"].username
    page = client.get(reverse("frontend:group", args=[fleet.group.pk])).content.decode()
    assert f'data-live="group-{fleet.group.pk}"' in page  # refreshed when the release changes
    release = page.split('id="group-release"')[1].split("</dl>")[0]
    assert fleet.version.label in release and "known good" in release
    assert AuditEvent.objects.filter(action="device_group.release_set").count() == 1

    # No version chosen, a version that does not exist, a draft: refused with a message.
    client.post(url, {})
    client.post(url, {"version": 999_999})
    assert DeviceGroup.objects.get(pk=fleet.group.pk).release_version_id == fleet.version.pk

    client.post(url, {"clear": "1"})
    assert DeviceGroup.objects.get(pk=fleet.group.pk).release_version_id is None
    history = client.get(reverse("frontend:group", args=[fleet.group.pk])).content.decode()
    assert "cleared" in history
