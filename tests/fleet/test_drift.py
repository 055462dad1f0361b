"""Drift: sketches scored against the version's reference, bad sketches refused, summaries,
and versions flagged when accuracy on feedback drops."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from devices_agent.data import load_digits_split
from devices_agent.drift import DriftSketch
from fleet.drift import psi
from fleet.models import DeviceGroup, DriftReport, MetricSample
from fleet.services.drift import drift_check

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.fleet.urls")]


def _sketch(x: np.ndarray, confidence: np.ndarray | None = None) -> dict[str, Any]:
    sketch = DriftSketch(num_features=x.shape[1])
    sketch.update(inputs=x, confidence=np.full(len(x), 0.95) if confidence is None else confidence)
    return sketch.to_dict()


def test_pure_psi_is_zero_for_equal_and_large_for_moved_histograms() -> None:
    assert psi(observed=[10, 20, 70], expected=[1, 2, 7]) == pytest.approx(0.0, abs=1e-12)
    assert psi(observed=[70, 20, 10], expected=[10, 20, 70]) > 1.0


def test_unshifted_inputs_do_not_alert_and_shifted_ones_do(enroll: Any, make_version: Any) -> None:
    agent = enroll()
    version = make_version()
    _, _, x_test, _ = load_digits_split()
    plain = agent.post("drift", {**_sketch(x_test[:200]), "version_id": version.pk})
    assert plain.status_code == 200, plain.content
    assert plain.json()["alert"] is False
    version.refresh_from_db()
    assert version.metrics["drift_reference"]["count"] > 1000  # computed lazily, on the train split

    shifted = np.clip(x_test[:200] + 0.3, 0.0, 1.0)
    moved = agent.post("drift", {**_sketch(shifted), "version_id": version.pk})
    assert moved.status_code == 200 and moved.json()["alert"] is True
    report = DriftReport.objects.get(pk=moved.json()["id"])
    assert report.z_max > 4.0 and report.device_id == agent.device.pk


def test_confidence_histogram_shift_alerts_by_psi(enroll: Any, make_version: Any) -> None:
    agent = enroll()
    version = make_version()
    _, _, x_test, _ = load_digits_split()
    reference = _sketch(load_digits_split()[0])  # confident on the train split: all in the top bin
    version.metrics = {"drift_reference": reference}
    version.save()
    same = agent.post("drift", {**_sketch(x_test[:100]), "version_id": version.pk}).json()
    assert same["alert"] is False
    unsure = _sketch(x_test[:100], confidence=np.full(100, 0.35))
    body = agent.post("drift", {**unsure, "version_id": version.pk}).json()
    assert body["alert"] is True
    assert DriftReport.objects.get(pk=body["id"]).psi > 0.2


@pytest.mark.parametrize(
    "change",
    [
        {"count": -1},
        {"mean": []},
        {"m2": [0.0]},
        {"mean": ["x"] * 64},
        {"m2": [-1.0] * 64},
        {"confidence_hist": [1, 2]},
        {"confidence_hist": [-1] * 10},
        {"version_id": "one"},
        {"window_end": "yesterday"},
    ],
)
def test_malformed_sketches_are_refused(enroll: Any, change: dict[str, Any]) -> None:
    agent = enroll()
    body = {**_sketch(np.zeros((3, 64))), **change}
    response = agent.post("drift", body)
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "validation_error"
    assert not DriftReport.objects.exists()


def test_nan_is_refused(enroll: Any) -> None:
    agent = enroll()
    raw = '{"count": 1, "mean": [NaN], "m2": [0], "confidence_hist": [0,0,0,0,0,0,0,0,0,1]}'
    assert agent.post("drift", raw).status_code == 400


def test_group_summary_counts_devices_in_alert(enroll: Any, operator_client: Any) -> None:
    group = DeviceGroup.objects.create(name="lab")
    agents = [enroll(), enroll(), enroll()]
    for agent in agents:
        agent.device.groups.add(group)
    now = timezone.now()
    DriftReport.objects.create(device=agents[0].device, window_end=now - timedelta(minutes=5), alert=False)
    DriftReport.objects.create(device=agents[0].device, window_end=now, alert=True)
    DriftReport.objects.create(device=agents[1].device, window_end=now, alert=False)
    response = operator_client.get(f"/api/v1/drift/?group={group.pk}")
    assert response.status_code == 200, response.content
    [entry] = response.json()["groups"]
    assert entry["devices"] == 3 and entry["reporting"] == 2 and entry["alerting"] == 1
    assert entry["alert_share"] == pytest.approx(0.5)
    assert entry["alert_devices"] == [str(agents[0].device.pk)]


def _feedback(device: Any, version: Any, *, n: int, correct: int) -> None:
    now = timezone.now()
    MetricSample.objects.bulk_create(
        MetricSample(
            device=device, version=version, name="correct", value=1.0 if i < correct else 0.0, ts=now
        )
        for i in range(n)
    )


def test_drift_check_flags_only_real_drops_with_enough_samples(
    enroll: Any, make_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    device = enroll().device
    few, steady, dropped = make_version(), make_version(), make_version()
    for version in (few, steady, dropped):
        version.metrics = {"accuracy": 0.95}
        version.save()
    _feedback(device, few, n=150, correct=50)  # a big drop, but too few samples
    _feedback(device, steady, n=300, correct=276)  # 0.92: within 0.05
    _feedback(device, dropped, n=300, correct=240)  # 0.80
    with django_capture_on_commit_callbacks(execute=False) as emitted:
        assert drift_check() == [dropped.pk]
    assert len(emitted) == 1  # the model.flagged webhook, created after commit
    dropped.refresh_from_db()
    assert dropped.metrics["flagged"]["reason"] == "accuracy_drop"
    assert dropped.metrics["flagged"]["accuracy"] == pytest.approx(0.8)
    assert dropped.metrics["flagged"]["reference_accuracy"] == pytest.approx(0.95)
    for version in (few, steady):
        version.refresh_from_db()
        assert "flagged" not in version.metrics
    with django_capture_on_commit_callbacks(execute=False) as emitted:
        assert drift_check() == []  # idempotent: flagged once
    assert emitted == []


def test_old_feedback_does_not_count(enroll: Any, make_version: Any) -> None:
    device = enroll().device
    version = make_version()
    version.metrics = {"accuracy": 0.95}
    version.save()
    _feedback(device, version, n=300, correct=0)
    assert drift_check(now=timezone.now() + timedelta(hours=2)) == []


def test_reference_runs_the_onnx_artifact_for_the_confidence_histogram(make_version: Any) -> None:
    from models_registry.drift_reference import drift_reference_compute
    from tests.devices_agent.agent_helpers import linear_onnx

    version = make_version(onnx=linear_onnx())
    reference = drift_reference_compute(version_id=version.pk)
    x_train = load_digits_split()[0]
    assert reference["count"] == len(x_train) and sum(reference["confidence_hist"]) == len(x_train)
    np.testing.assert_allclose(reference["mean"], x_train.mean(axis=0), atol=1e-4)
    version.refresh_from_db()
    assert version.metrics["drift_reference"] == reference
