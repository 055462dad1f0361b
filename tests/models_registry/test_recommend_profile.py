"""Recommendation for a hardware profile from on-device latency, with server fallback."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from fleet.models import Device, MetricSample
from models_registry.models import ModelFamily, ModelVersion

pytestmark = pytest.mark.django_db

BUDGET_US = 150.0


@pytest.fixture
def family() -> ModelFamily:
    # Two evaluated versions: on the server the int8 variant is fast enough and smaller,
    # so without fleet numbers it wins.
    family = ModelFamily.objects.create(name="profile-mlp", arch="mlp", input_shape=[64], num_classes=10)
    base = ModelVersion.objects.create(
        family=family,
        number=1,
        stage=ModelVersion.Stage.PRODUCTION,
        metrics={"accuracy": 0.95, "size_bytes": 4000, "p50_batch1_us": 100.0},
    )
    ModelVersion.objects.create(
        family=family,
        number=2,
        parent=base,
        source=ModelVersion.Source.OPTIMISED,
        variant="int8_dynamic",
        stage=ModelVersion.Stage.STAGING,
        metrics={"accuracy": 0.945, "size_bytes": 1200, "p50_batch1_us": 80.0},
    )
    return family


def _device(*, arch: str = "aarch64", cores: int = 4, accelerator: str = "") -> Device:
    return Device.objects.create(
        name=f"board-{uuid.uuid4().hex[:6]}", arch=arch, cores=cores, accelerator=accelerator
    )


def _samples(
    *, device: Device, version: ModelVersion, ms: float, n: int, age: timedelta = timedelta()
) -> None:
    now = timezone.now() - age
    MetricSample.objects.bulk_create(
        MetricSample(device=device, version=version, name="latency_ms", value=ms + 1e-5 * i, ts=now)
        for i in range(n)
    )


def _recommend(client: Any, family: ModelFamily, extra: str = "") -> Any:
    return client.get(f"/api/v1/models/{family.pk}/recommend/?latency_budget_us={BUDGET_US}{extra}")


def _rows(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["variant"]: r for r in body["variants"]}


def test_fleet_latency_of_the_profile_changes_the_recommendation(
    viewer_client: Any, family: ModelFamily
) -> None:
    fp32, int8 = family.versions.order_by("number")
    server = _recommend(viewer_client, family).json()
    assert server["recommended"]["variant"] == "int8_dynamic"

    board = _device()
    # On this board int8 is slow (no fast int8 kernels): 0.3 ms against the server's 80 us.
    _samples(device=board, version=int8, ms=0.3, n=60)
    _samples(device=board, version=fp32, ms=0.12, n=60)
    # Another profile and stale samples must not count.
    other = _device(arch="x86_64", cores=8)
    _samples(device=other, version=int8, ms=0.01, n=500)
    _samples(device=board, version=int8, ms=0.01, n=500, age=timedelta(hours=30))

    response = _recommend(viewer_client, family, f"&device={board.pk}")
    assert response.status_code == 200, response.content
    body = response.json()
    rows = _rows(body)
    assert body["profile"] == "aarch64:4:"
    assert rows["int8_dynamic"]["latency_source"] == "fleet"
    assert rows["int8_dynamic"]["latency_samples"] == 60
    assert rows["int8_dynamic"]["p50_batch1_us"] == pytest.approx(300.0, abs=1.0)
    assert rows["int8_dynamic"]["server_p50_batch1_us"] == 80.0
    assert rows["int8_dynamic"]["decision"] == "rejected"
    assert body["recommended"]["variant"] == "fp32"
    assert body["recommended"]["latency_source"] == "fleet"

    by_profile = _recommend(viewer_client, family, "&profile=aarch64:4:").json()
    assert by_profile["recommended"]["version_id"] == fp32.pk
    # The x86 boards run int8 fast: there the int8 variant stays the pick.
    fast = _recommend(viewer_client, family, "&profile=x86_64:8:&min_samples=50").json()
    assert _rows(fast)["int8_dynamic"]["latency_source"] == "fleet"
    assert _rows(fast)["fp32"]["latency_source"] == "server"
    assert fast["recommended"]["variant"] == "int8_dynamic"


def test_too_few_samples_fall_back_to_the_server(viewer_client: Any, family: ModelFamily) -> None:
    int8 = family.versions.get(number=2)
    board = _device()
    _samples(device=board, version=int8, ms=0.3, n=10)
    body = _recommend(viewer_client, family, f"&device={board.pk}").json()
    rows = _rows(body)
    assert rows["int8_dynamic"]["latency_source"] == "server"
    assert rows["int8_dynamic"]["latency_samples"] == 10
    assert rows["int8_dynamic"]["p50_batch1_us"] == 80.0
    assert rows["fp32"]["latency_source"] == "server" and rows["fp32"]["latency_samples"] == 0
    assert body["recommended"]["variant"] == "int8_dynamic"
    # Lowering the threshold lets the ten samples decide.
    lowered = _recommend(viewer_client, family, f"&device={board.pk}&min_samples=10").json()
    assert lowered["recommended"]["variant"] == "fp32"


def test_unknown_device_and_bad_profile(viewer_client: Any, family: ModelFamily) -> None:
    missing = _recommend(viewer_client, family, f"&device={uuid.uuid4()}")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "device_not_found"
    bad = _recommend(viewer_client, family, "&profile=aarch64:four:")
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_profile"
    both = _recommend(viewer_client, family, f"&profile=aarch64:4:&device={uuid.uuid4()}")
    assert both.status_code == 400


def test_regression_families_are_recommended_by_mae(viewer_client: Any) -> None:
    from models_registry.selectors import family_comparison, family_recommend

    family = ModelFamily.objects.create(
        name="profile-regress", task="regression", input_shape=[4], output_size=2
    )
    base = ModelVersion.objects.create(
        family=family,
        number=1,
        stage=ModelVersion.Stage.PRODUCTION,
        metrics={"mae": 0.20, "size_bytes": 4000, "p50_batch1_us": 100.0},
    )
    for number, variant, mae, size in ((2, "int8_dynamic", 0.205, 1200), (3, "fp16", 0.5, 2000)):
        ModelVersion.objects.create(
            family=family,
            number=number,
            parent=base,
            source=ModelVersion.Source.OPTIMISED,
            variant=variant,
            metrics={"mae": mae, "size_bytes": size, "p50_batch1_us": 80.0},
        )
    rows = {r["variant"]: r for r in family_comparison(family)}
    assert rows["fp16"]["metric"] == "mae" and rows["fp16"]["metric_drop"] == pytest.approx(0.3)
    assert rows["fp16"]["accuracy"] is None
    answer = family_recommend(family, latency_budget_us=BUDGET_US, max_accuracy_drop=0.01)
    assert answer["metric"] == "mae" and answer["recommended"]["variant"] == "int8_dynamic"
    assert "mae 0.5000 above 0.2100" in {r["variant"]: r for r in answer["variants"]}["fp16"]["reason"]
    capped = family_recommend(family, latency_budget_us=BUDGET_US, max_accuracy_drop=0.01, max_mae=0.201)
    assert capped["recommended"]["variant"] == "fp32"
    # Through the API, a drop above 1 is fine for mae.
    response = _recommend(viewer_client, family, "&max_accuracy_drop=0.5")
    assert response.status_code == 200, response.content
    assert response.json()["recommended"]["variant"] == "int8_dynamic"
