"""The dashboard for a regression family: its contract, versions judged by mae (centrally or
on the boards), federated rounds with evaluation rounds, and boards' learning facts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
from django.urls import reverse
from django.utils import timezone

from tests.frontend.conftest import make_devices, make_version
from tests.frontend.test_query_counts import queries_for

pytestmark = pytest.mark.django_db

SPREAD = {"metric": "mae", "value": 0.42, "devices": 3, "examples": 90, "min": 0.31, "max": 0.55, "std": 0.1}


@dataclass
class RegressionFleet:
    family: Any
    federated: Any  # judged on the boards' holdouts
    central: Any  # judged on a test set
    group: Any
    devices: list[Any]
    job: Any


@pytest.fixture
def regression(db: Any) -> RegressionFleet:
    from fleet.models import Device, DeviceGroup, MetricSample
    from models_registry.models import EvaluationReport
    from tests.bundles import regression_family
    from training.models import ClientUpdate, FederatedJob, FederatedRound

    now = timezone.now()
    family = regression_family()
    federated = make_version(
        family=family, mae=0.42, rmse=0.5, loss=0.25, evaluation="federated", federated_evaluation=SPREAD
    )
    central = make_version(family=family, parent=federated, stage="staging", mae=0.38, evaluation="central")
    EvaluationReport.objects.create(
        version=central,
        dataset="sensor-test",
        report={
            "num_examples": 200,
            "output_size": 1,
            "mae": 0.38,
            "rmse": 0.47,
            "loss": 0.2209,
            "mae_per_output": [0.38],
            "r2": [0.81],
            "latency_us": {"batch_1": {"p50_us": 30.0, "p95_us": 45.0}},
            "size_bytes": 1500,
            "parameter_count": 161,
        },
    )
    # Canary: the staging version ``central`` may be tried on it.
    group = DeviceGroup.objects.create(name="sensors", canary=True)
    devices = make_devices(count=4, group=group, version=federated, prefix="sensor")
    first = devices[0]
    Device.objects.filter(pk=first.pk).update(
        state={
            "local_examples": 120,
            "holdout_examples": 30,
            "training_backends": ["torch", "ort"],
            "idle": True,
        },
        hardware={"python": "3.11.2", "training_backends": ["torch"]},
    )
    MetricSample.objects.bulk_create(
        [
            MetricSample(device=first, version=federated, name="abs_error", value=0.4 + i % 3 / 10, ts=now)
            for i in range(30)
        ]
        + [
            MetricSample(device=d, version=federated, name=name, value=value, ts=now)
            for d in devices[:2]
            for name, value in (("global_mae", 0.5), ("personal_mae", 0.35))
        ]
    )
    job = FederatedJob.objects.create(
        name="sensors federated",
        family=family,
        base_version=federated,
        target_group=group,
        status="succeeded",
        rounds=1,
        current_round=2,
        best_version=federated,
        best_metric=0.42,
        backends=["torch", "ort"],
    )
    FederatedRound.objects.create(
        job=job,
        number=1,
        base_version=federated,
        status="done",
        participants=2,
        loss=0.3,
        version=central,
        metric_name="mae",
        metric=0.5,
        evaluation="federated",
        evaluation_detail={**SPREAD, "value": 0.5},
    )
    final = FederatedRound.objects.create(
        job=job,
        number=2,
        kind="evaluate",
        base_version=central,
        status="done",
        selected=[str(d.pk) for d in devices[:2]],
        participants=2,
        metric_name="mae",
        metric=0.42,
        evaluation="federated",
        evaluation_detail=SPREAD,
    )
    ClientUpdate.objects.create(
        round=final,
        device=devices[0],
        status="accepted",
        num_examples=120,
        metrics={"holdout_mae": 0.41, "holdout_examples": 30, "backend_torch": 1.0},
    )
    ClientUpdate.objects.create(
        round=final,
        device=devices[1],
        status="accepted",
        num_examples=80,
        metrics={"holdout_mae": 0.44, "holdout_examples": 20, "backend_ort": 1.0},
    )
    return RegressionFleet(
        family=family, federated=federated, central=central, group=group, devices=devices, job=job
    )


def test_family_page_states_the_task_contract_and_mae_per_version(
    page_client: Any, regression: RegressionFleet
) -> None:
    response = page_client("viewer").get(reverse("frontend:family", args=[regression.family.pk]))
    assert response.status_code == 200
    contract = response.context["contract"]
    assert contract["task"] == "regression" and contract["metric"] == "mae" and contract["outputs"] == 1
    body = response.content.decode()
    panel = body.split('id="family-contract"')[1].split("</dl>")[0]
    assert "regression" in panel and "[8] float32" in panel and "lower is better" in panel
    assert "abs_error" in panel and "mean squared error" in panel
    table = body.split('id="variants"')[1].split("</table>")[0]
    assert "RMSE" in table and "macro AUC" not in table and ">mae<" in table
    rows = {r["version"].pk: r for r in response.context["rows"]}
    assert rows[regression.federated.pk]["primary"] == pytest.approx(0.42)
    assert rows[regression.federated.pk]["evaluation"]["kind"] == "federated"
    assert rows[regression.central.pk]["evaluation"]["kind"] == "central"
    assert "3 boards, 0.31–0.55" in table and "0.38" in table


def test_version_page_shows_program_head_and_the_federated_spread(
    page_client: Any, regression: RegressionFleet
) -> None:
    response = page_client("viewer").get(reverse("frontend:version", args=[regression.federated.pk]))
    assert response.status_code == 200
    body = response.content.decode()
    artifacts = body.split('id="version-artifacts"')[1].split('id="version-evaluation"')[0]
    assert [row["artifact"].kind for row in response.context["artifacts"]] == ["onnx", "weights", "program"]
    assert "trained on boards" in artifacts and "serve, train and personalise" in artifacts
    assert "out.weight, out.bias" in artifacts
    evaluation = body.split('id="version-evaluation"')[1].split("</dl>")[0]
    assert "federated, on the boards' holdouts" in evaluation
    assert "3 boards, 90 holdout examples" in evaluation and "min 0.31, max 0.55" in evaluation
    assert "0.42" in evaluation and "lower is better" in evaluation
    assert 'id="confusion"' not in body


def test_version_page_draws_a_regression_report(page_client: Any, regression: RegressionFleet) -> None:
    response = page_client("viewer").get(reverse("frontend:version", args=[regression.central.pk]))
    body = response.content.decode()
    assert response.context["evaluation"]["regression"] is True
    assert response.context["evaluation"]["per_output"] == [{"output": 0, "mae": 0.38, "r2": 0.81}]
    assert 'id="per-output"' in body and "0.4700" in body and 'id="confusion"' not in body
    assert "centrally, on the family" in body.split('id="version-evaluated"')[1].split("</dd>")[0]


def test_job_page_shows_mae_per_round_evaluation_rounds_backends_and_holdouts(
    page_client: Any, regression: RegressionFleet
) -> None:
    response = page_client("viewer").get(reverse("frontend:job", args=[regression.job.pk]))
    assert response.status_code == 200
    assert response.context["metric"] == "mae" and response.context["best"] == pytest.approx(0.42)
    assert response.context["evaluation_rounds"] == 1
    chart = response.context["charts"][0]
    assert chart["title"] == "Mean absolute error and loss per round"
    assert chart["spec"]["labels"] == ["1", "2 (eval)"]
    assert chart["spec"]["series"][0] == {"label": "mae", "data": [0.5, 0.42], "axis": "y"}
    body = response.content.decode()
    assert 'id="job-best">0.42<' in body and "best mae" in body
    rounds = body.split('id="rounds"')[1].split("</table>")[0]
    assert "evaluation-round" in rounds and "federated" in rounds and "3 boards, 0.31–0.55" in rounds
    assert regression.central.label in rounds  # what the evaluation round judged
    updates = {str(u["update"].device_id): u for u in response.context["participants"]["updates"]}
    first, second = updates[str(regression.devices[0].pk)], updates[str(regression.devices[1].pk)]
    assert (first["backend"], first["holdout"], first["holdout_examples"]) == ("torch", 0.41, 30)
    assert (second["backend"], second["holdout"]) == ("ort", 0.44)
    assert "holdout mae" in body and ">ort<" in body


def test_job_list_and_overview_name_the_best_mae(page_client: Any, regression: RegressionFleet) -> None:
    from training.models import FederatedJob

    client = page_client("viewer")
    body = client.get(reverse("frontend:jobs")).content.decode()
    assert '0.42 <span class="muted">mae</span>' in body
    FederatedJob.objects.filter(pk=regression.job.pk).update(status="running")
    overview = client.get(reverse("frontend:overview")).content.decode()
    assert "best mae 0.42" in overview


def test_device_page_shows_examples_backends_and_the_mae_gain(
    page_client: Any, regression: RegressionFleet
) -> None:
    response = page_client("viewer").get(reverse("frontend:device", args=[regression.devices[0].pk]))
    assert response.status_code == 200
    learning = response.context["learning"]
    assert learning["local_examples"] == 120 and learning["holdout_examples"] == 30
    assert learning["training_backends"] == ["torch", "ort"] and learning["other_state"] == {"idle": True}
    body = response.content.decode()
    panel = body.split('id="device-learning"')[1].split("</dl>")[0]
    assert "120" in panel and "30" in panel and "torch, ort" in panel
    personal = response.context["personal"]
    assert personal["metric"] == "mae" and personal["gain"] == pytest.approx(0.15)
    drift = body.split('id="device-drift"')[1].split("</dl>")[0]
    assert "global mae" in drift and "0.35" in drift and "+0.15" in drift
    titles = [c["title"] for c in response.context["charts"]]
    assert "Error on labelled feedback" in titles and "Accuracy on labelled feedback" not in titles


def test_device_without_reported_state_reads_backends_from_its_hardware(
    page_client: Any, regression: RegressionFleet
) -> None:
    from fleet.models import Device

    Device.objects.filter(pk=regression.devices[1].pk).update(state={}, hardware={"training_backends": []})
    response = page_client("viewer").get(reverse("frontend:device", args=[regression.devices[1].pk]))
    assert response.context["learning"]["training_backends"] == []
    assert "inference only" in response.content.decode().split('id="device-learning"')[1]


def test_overview_shows_an_mae_flag_and_the_mae_gain(page_client: Any, regression: RegressionFleet) -> None:
    version = regression.federated
    version.metrics = {
        **version.metrics,
        "flagged": {
            "reason": "mae_rise",
            "metric": "mae",
            "value": 0.61,
            "reference": 0.42,
            "mae": 0.61,
            "reference_mae": 0.42,
            "samples": 250,
        },
    }
    version.save()
    response = page_client("viewer").get(reverse("frontend:overview"))
    [flag] = response.context["flagged"]
    assert (flag["metric"], flag["value"], flag["reference"]) == ("mae", 0.61, 0.42)
    [group] = response.context["personal_groups"]
    assert group["metric"] == "mae" and group["mean_gain"] == pytest.approx(0.15)
    html = response.content.decode()
    drift_panel = html.split('id="drift-panel"')[1].split('id="personalisation-panel"')[0]
    assert "mae" in drift_panel and "0.61" in drift_panel and "0.42" in drift_panel and "250" in drift_panel
    assert "+0.15" in html.split('id="personalisation-panel"')[1]


def test_rollout_form_makes_an_mae_gate(page_client: Any, regression: RegressionFleet) -> None:
    from fleet.models import Rollout

    client = page_client("operator")
    response = client.post(
        reverse("frontend:rollout-new"),
        {
            "version": regression.central.pk,
            "target_group": regression.group.pk,
            "waves": "50, 100",
            "soak_s": "60",
            "gate_mae_max_increase_pct": "10",
            "gate_min_samples": "40",
        },
    )
    assert response.status_code == 302
    rollout = Rollout.objects.get(version=regression.central)
    assert rollout.gates == [{"metric": "mae", "max_increase_pct": 10.0, "min_samples": 40, "min_devices": 3}]
    refused = client.post(
        reverse("frontend:rollout-new"),
        {"version": regression.central.pk, "target_group": regression.group.pk, "gate_accuracy_min": "0.9"},
        follow=True,
    )
    assert "does not fit a regression family" in refused.content.decode()


def test_experiment_form_defaults_to_the_family_metric(page_client: Any, regression: RegressionFleet) -> None:
    from fleet.models import Experiment

    response = page_client("operator").post(
        reverse("frontend:experiment-new"),
        {
            "name": "sensors a/b",
            "target_group": regression.group.pk,
            "control_version": regression.federated.pk,
            "candidate_version": regression.central.pk,
            "primary_metric": "",
        },
    )
    assert response.status_code == 302
    assert Experiment.objects.get(name="sensors a/b").primary_metric == "mae"


def test_job_page_query_count_does_not_grow_with_updates(
    page_client: Any, regression: RegressionFleet
) -> None:
    from training.models import ClientUpdate, FederatedRound

    client = page_client("viewer")
    url = reverse("frontend:job", args=[regression.job.pk])
    queries_for(client, url)
    small = queries_for(client, url)
    final = FederatedRound.objects.get(job=regression.job, number=2)
    more = make_devices(count=30, group=regression.group, version=regression.federated, prefix="more")
    ClientUpdate.objects.bulk_create(
        [
            ClientUpdate(
                round=final,
                device=d,
                status="accepted",
                num_examples=10,
                metrics={"holdout_mae": 0.4, "holdout_examples": 5, "backend_torch": 1.0},
            )
            for d in more
        ]
    )
    assert queries_for(client, url) == small


@pytest.mark.parametrize(
    "url_name", ["frontend:overview", "frontend:devices", "frontend:jobs", "frontend:models"]
)
def test_list_pages_keep_their_query_count_as_a_regression_fleet_grows(
    page_client: Any, regression: RegressionFleet, url_name: str
) -> None:
    from fleet.models import Device, DriftReport, MetricSample

    client = page_client("viewer")
    url = reverse(url_name)
    queries_for(client, url)
    small = queries_for(client, url)
    grown = make_devices(count=60, group=regression.group, version=regression.central, prefix="grown")
    now = timezone.now()
    DriftReport.objects.bulk_create([DriftReport(device=d, window_end=now, alert=False) for d in grown])
    Device.objects.filter(pk__in=[d.pk for d in grown]).update(drift_alert=False, drift_window_end=now)
    MetricSample.objects.bulk_create(
        [
            MetricSample(device=d, version=regression.central, name=name, value=value, ts=now)
            for d in grown
            for name, value in (("global_mae", 0.5), ("personal_mae", 0.4))
        ]
    )
    assert queries_for(client, url) == small
