from __future__ import annotations

from typing import Any

import pytest

from models_registry import tasks
from models_registry.models import ModelJob

pytestmark = pytest.mark.django_db

FAST = {"latency_repeats": 5}


def _post(client: Any, url: str, body: dict[str, Any], capture: Any) -> Any:
    with capture(execute=False):
        return client.post(url, body, format="json")


def test_job_actions_queue_jobs_and_report_them(
    viewer_client: Any, operator_client: Any, trained_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    url = f"/api/v1/model-versions/{trained_version.pk}"
    denied = _post(viewer_client, f"{url}/evaluate/", FAST, django_capture_on_commit_callbacks)
    assert denied.status_code == 403
    queued = _post(operator_client, f"{url}/evaluate/", FAST, django_capture_on_commit_callbacks)
    assert queued.status_code == 202, queued.content
    assert queued.json()["status"] == "queued" and queued.json()["kind"] == "evaluate"
    bad = _post(operator_client, f"{url}/optimise/", {"kind": "int3"}, django_capture_on_commit_callbacks)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "validation_error"

    tasks.evaluate_version(queued.json()["id"])
    job = viewer_client.get(f"/api/v1/model-jobs/{queued.json()['id']}/").json()
    assert job["status"] == "succeeded" and job["result"]["accuracy"] > 0.8
    listing = viewer_client.get("/api/v1/model-jobs/?status=succeeded").json()
    assert [j["id"] for j in listing["results"]] == [job["id"]]


def test_comparison_and_recommendation(
    viewer_client: Any,
    operator_client: Any,
    admin_client_api: Any,
    trained_version: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    url = f"/api/v1/model-versions/{trained_version.pk}"
    for kind in ("int8_dynamic", "fp16"):
        body = {"kind": kind, **FAST}
        response = _post(operator_client, f"{url}/optimise/", body, django_capture_on_commit_callbacks)
        assert response.status_code == 202
        tasks.optimise_version(response.json()["id"])
    assert set(ModelJob.objects.values_list("status", flat=True)) == {"succeeded"}
    family_id = trained_version.family_id
    rows = viewer_client.get(f"/api/v1/models/{family_id}/comparison/").json()
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"fp32", "int8_dynamic", "fp16"}
    assert by_variant["fp32"]["size_ratio"] == 1.0
    assert by_variant["int8_dynamic"]["size_ratio"] < 0.5
    assert by_variant["fp16"]["baseline_id"] == trained_version.pk
    assert all(r["rejected"] is False for r in rows)

    generous = viewer_client.get(
        f"/api/v1/models/{family_id}/recommend/?latency_budget_us=1e9&max_accuracy_drop=0.02"
    )
    assert generous.status_code == 200, generous.content
    answer = generous.json()
    # The smallest eligible variant wins; int8 is a quarter of fp32's size.
    smallest = min(
        (r for r in answer["variants"] if r["decision"] != "rejected"), key=lambda r: r["size_bytes"]
    )
    assert answer["recommended"]["version_id"] == smallest["version_id"]
    assert answer["base"]["version_id"] == trained_version.pk
    impossible = viewer_client.get(f"/api/v1/models/{family_id}/recommend/?latency_budget_us=0.01").json()
    assert impossible["recommended"] is None
    assert all(r["decision"] == "rejected" and "over budget" in r["reason"] for r in impossible["variants"])
    missing = viewer_client.get(f"/api/v1/models/{family_id}/recommend/")
    assert missing.status_code == 400


def test_schema_has_job_paths(client: Any) -> None:
    from drf_spectacular.generators import SchemaGenerator

    paths = SchemaGenerator().get_schema(request=None, public=True)["paths"]
    for path in (
        "/api/v1/model-versions/{id}/evaluate/",
        "/api/v1/model-versions/{id}/export/",
        "/api/v1/model-versions/{id}/optimise/",
        "/api/v1/model-jobs/{id}/",
        "/api/v1/models/{id}/comparison/",
        "/api/v1/models/{id}/recommend/",
        "/api/v1/evaluation-datasets/",
        "/api/v1/datasets/",
        "/api/v1/datasets/{id}/",
    ):
        assert path in paths, path


def test_refusals_are_400_with_their_codes(
    operator_client: Any,
    trained_version: Any,
    family: Any,
    mlp_bundle: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from models_registry.services import family_create, version_create

    url = f"/api/v1/model-versions/{trained_version.pk}"
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("optimise", {"kind": "prune_structured"}, "not_supported"),
        ("optimise", {"kind": "distil"}, "no_student"),
        ("optimise", {"kind": "fp16", "max_metric_drop": 0.1, "max_accuracy_drop": 0.2}, "invalid_params"),
        ("evaluate", {"dataset": "digits-mlp-train"}, "wrong_split"),
    ]
    for action, body, code in cases:
        response = _post(operator_client, f"{url}/{action}/", body, django_capture_on_commit_callbacks)
        assert response.status_code == 400, response.content
        assert response.json()["error"]["code"] == code
    other = family_create(name="no-data", input_shape=[64], num_classes=10)
    lonely = version_create(family=other, weights=mlp_bundle.weights, onnx=mlp_bundle.onnx)
    response = _post(
        operator_client,
        f"/api/v1/model-versions/{lonely.pk}/evaluate/",
        {},
        django_capture_on_commit_callbacks,
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "no_dataset"
    assert "federated" in response.json()["error"]["message"]
    assert not ModelJob.objects.exists()
