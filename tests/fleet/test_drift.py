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
from fleet.drift import drift_score, psi, psi_band
from fleet.models import DeviceGroup, DriftReport, MetricSample
from fleet.selectors.drift import drift_reporting_groups
from fleet.services.drift import device_drift_latest, drift_check

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.fleet.urls")]


def _sketch(x: np.ndarray, confidence: np.ndarray | None = None) -> dict[str, Any]:
    sketch = DriftSketch(num_features=x.shape[1])
    sketch.update(inputs=x, confidence=np.full(len(x), 0.95) if confidence is None else confidence)
    return sketch.to_dict()


def test_pure_psi_is_zero_for_equal_and_large_for_moved_histograms() -> None:
    assert psi(observed=[10, 20, 70], expected=[1, 2, 7]) == pytest.approx(0.0, abs=1e-12)
    assert psi(observed=[70, 20, 10], expected=[10, 20, 70]) > 1.0


def test_psi_matches_a_hand_computed_value() -> None:
    # Shares p = (0.5, 0.3, 0.2) against q = (0.25, 0.25, 0.5):
    # (0.25 ln 2) + (0.05 ln 1.2) + (-0.3 ln 0.4) = 0.17329 + 0.00912 + 0.27489 = 0.45730.
    assert psi(observed=[50, 30, 20], expected=[25, 25, 50]) == pytest.approx(0.457298, abs=1e-5)
    assert psi_band(0.05, moderate=0.1, major=0.25) == "none"
    assert psi_band(0.1, moderate=0.1, major=0.25) == "moderate"
    assert psi_band(0.457, moderate=0.1, major=0.25) == "major"
    assert psi_band(None, moderate=0.1, major=0.25) is None


def _moments(x: np.ndarray) -> dict[str, Any]:
    return {
        "count": len(x),
        "mean": x.mean(axis=0).tolist(),
        "m2": (((x - x.mean(axis=0)) ** 2).sum(axis=0)).tolist(),
    }


SCORE: dict[str, Any] = {
    "z_alert": 4.0,
    "psi_alert": 0.2,
    "effect_min": 0.5,
    "psi_moderate": 0.1,
    "psi_major": 0.25,
    "psi_min_samples": 500,
}


def test_a_large_window_with_a_tiny_shift_is_significant_but_no_alert() -> None:
    rng = np.random.default_rng(3)
    reference = {**_moments(rng.normal(size=(20_000, 4))), "confidence_hist": []}
    window = {**_moments(rng.normal(loc=0.1, size=(50_000, 4))), "confidence_hist": [0] * 10}
    score = drift_score(sketch=window, reference=reference, **SCORE)
    assert score.z_max > 10  # a 0.1 standard-deviation shift is certain at this size...
    assert score.effect_size == pytest.approx(0.1, abs=0.03)  # ...but small
    assert not score.alert and score.score < 1.0
    # Judged on z alone (effect_min=0), the same window would alert: what the old rule did.
    assert drift_score(sketch=window, reference=reference, **{**SCORE, "effect_min": 0.0}).alert


def test_a_real_shift_alerts_and_a_short_window_of_it_does_not() -> None:
    rng = np.random.default_rng(4)
    reference = {**_moments(rng.normal(size=(20_000, 4))), "confidence_hist": []}
    moved = rng.normal(loc=0.8, size=(2_000, 4))
    score = drift_score(sketch={**_moments(moved), "confidence_hist": [0] * 10}, reference=reference, **SCORE)
    assert score.alert and score.effect_size > 0.5 and score.z_max > 4.0
    assert score.alert_feature is not None
    # Five inputs of a large shift are not significant: no alert on size alone.
    few = drift_score(
        sketch={**_moments(moved[:3]), "confidence_hist": [0] * 10}, reference=reference, **SCORE
    )
    assert few.effect_size > 0.3 and few.z_max < 4.0 and not few.alert


def test_a_major_feature_psi_alerts_a_significant_shift_of_shape_without_a_large_mean_shift() -> None:
    from devices_agent.drift import DriftSketch
    from models_registry.drift_reference import reference_sketch

    rng = np.random.default_rng(5)
    ref_x = rng.normal(size=(20_000, 2))
    reference = reference_sketch(inputs=ref_x)
    bins = reference["feature_bins"]
    assert bins["features"] == [0, 1] and len(bins["edges"][0]) == 9
    # Same mean, the spread squeezed: little mean shift, but the bins fill very differently.
    squeezed = np.column_stack([rng.normal(loc=0.15, scale=0.3, size=5_000), rng.normal(size=5_000)])
    sketch = DriftSketch(num_features=2, feature_bins=bins)
    sketch.update(inputs=squeezed, confidence=np.zeros(0))
    window = sketch.to_dict()
    score = drift_score(sketch=window, reference=reference, **SCORE)
    assert score.effect_size < 0.5 and score.z_max > 4.0
    assert score.feature_psi is not None and score.feature_psi > 0.25 and score.feature_psi_feature == 0
    assert score.psi_band == "major" and score.alert
    # Eighty inputs of a squeeze: the PSI is shown, but too few inputs for it to decide.
    short = DriftSketch(num_features=2, feature_bins=bins)
    short_x = np.column_stack([rng.normal(loc=0.25, scale=0.3, size=80), rng.normal(size=80)])
    short.update(inputs=short_x, confidence=np.zeros(0))
    few = drift_score(sketch=short.to_dict(), reference=reference, **SCORE)
    assert few.feature_psi is not None and few.feature_psi > 0.25 and few.z_max > 4.0
    assert few.effect_size < 0.5 and not few.alert
    assert drift_score(sketch=short.to_dict(), reference=reference, **{**SCORE, "psi_min_samples": 0}).alert
    # Counted over other bins (another etag), the counts are not compared.
    stale = drift_score(sketch={**window, "bins_etag": "other"}, reference=reference, **SCORE)
    assert stale.feature_psi is None and not stale.alert


@pytest.fixture
def references(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The registry's reference computation, faked: a sketch of the digits train split
    without confidences, or None for a version listed in ``none`` (a family without data)."""
    from models_registry import drift_reference
    from models_registry.models import ModelVersion

    state: dict[str, Any] = {"calls": [], "none": set()}

    def compute(*, version_id: int) -> dict[str, Any] | None:
        state["calls"].append(version_id)
        if version_id in state["none"]:
            return None
        reference = _sketch(load_digits_split()[0], confidence=np.zeros(0))
        version = ModelVersion.objects.get(pk=version_id)
        version.metrics = {**version.metrics, "drift_reference": reference}
        version.save(update_fields=["metrics"])
        return reference

    monkeypatch.setattr(drift_reference, "drift_reference_compute", compute)
    return state


def test_unshifted_inputs_do_not_alert_and_shifted_ones_do(
    enroll: Any, make_version: Any, references: dict[str, Any]
) -> None:
    agent = enroll()
    version = make_version()
    _, _, x_test, _ = load_digits_split()
    plain = agent.post("drift", {**_sketch(x_test[:200]), "version_id": version.pk})
    assert plain.status_code == 200, plain.content
    assert plain.json()["alert"] is False
    shifted = np.clip(x_test[:200] + 0.3, 0.0, 1.0)
    moved = agent.post("drift", {**_sketch(shifted), "version_id": version.pk})
    assert moved.status_code == 200 and moved.json()["alert"] is True
    report = DriftReport.objects.get(pk=moved.json()["id"])
    assert report.z_max > 4.0 and report.device_id == agent.device.pk and report.version_id == version.pk
    assert report.psi is None  # the reference has no confidence histogram
    assert references["calls"] == [version.pk]  # computed once, on the first report


def test_family_without_reference_gets_no_score(
    enroll: Any, make_regression_version: Any, references: dict[str, Any]
) -> None:
    agent = enroll()
    version = make_regression_version()
    references["none"].add(version.pk)
    rng = np.random.default_rng(0)
    response = agent.post("drift", {**_sketch(rng.normal(size=(50, 8))), "version_id": version.pk})
    assert response.status_code == 200, response.content
    assert response.json()["alert"] is False and response.json()["score"] is None
    report = DriftReport.objects.get(pk=response.json()["id"])
    assert report.version_id == version.pk and report.score is None and report.psi is None


def test_regression_reference_without_confidence_scores_by_the_mean_shift(
    enroll: Any, make_regression_version: Any
) -> None:
    agent = enroll()
    version = make_regression_version()
    rng = np.random.default_rng(1)
    reference = _sketch(rng.normal(size=(2000, 8)), confidence=np.zeros(0))
    del reference["confidence_hist"]  # a regression reference has no histogram at all
    version.metrics = {"drift_reference": reference}
    version.save()
    no_confidence = np.zeros(0)
    same = agent.post(
        "drift", {**_sketch(rng.normal(size=(200, 8)), no_confidence), "version_id": version.pk}
    )
    assert same.status_code == 200, same.content
    assert same.json()["alert"] is False and same.json()["score"] is not None
    moved_inputs = rng.normal(loc=1.0, size=(200, 8))
    moved = agent.post("drift", {**_sketch(moved_inputs, no_confidence), "version_id": version.pk}).json()
    assert moved["alert"] is True
    assert DriftReport.objects.get(pk=moved["id"]).psi is None


def test_sketch_of_another_input_size_is_stored_unscored(
    enroll: Any, make_version: Any, references: dict[str, Any]
) -> None:
    agent = enroll()
    version = make_version()  # digits: 64 features
    response = agent.post("drift", {**_sketch(np.zeros((5, 10))), "version_id": version.pk})
    assert response.status_code == 200, response.content
    assert response.json()["score"] is None
    assert references["calls"] == []  # no reference is computed for a sketch that cannot match it


def test_confidence_histogram_shift_alerts_by_psi(enroll: Any, make_version: Any, settings: Any) -> None:
    settings.DRIFT_PSI_MIN_SAMPLES = 100  # windows of 100 inputs are long enough here
    settings.DRIFT_BASELINE_SAMPLES = 100  # and the first one is the board's baseline
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
    # Too short a window for its PSI to decide: stored and shown, no alert on it alone.
    settings.DRIFT_PSI_MIN_SAMPLES = 500
    short = agent.post("drift", {**unsure, "version_id": version.pk}).json()
    assert short["alert"] is False and DriftReport.objects.get(pk=short["id"]).psi > 0.2


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
    # Reports in the order they arrive; the first device's older window comes last.
    for device, end, alert in (
        (agents[0].device, now, True),
        (agents[1].device, now, False),
        (agents[0].device, now - timedelta(minutes=5), False),
    ):
        DriftReport.objects.create(device=device, window_end=end, alert=alert)
        device_drift_latest(device_id=device.pk, alert=alert, window_end=end)
    response = operator_client.get(f"/api/v1/drift/?group={group.pk}")
    assert response.status_code == 200, response.content
    [entry] = response.json()["groups"]
    assert entry["devices"] == 3 and entry["reporting"] == 2 and entry["alerting"] == 1
    assert entry["alert_share"] == pytest.approx(0.5)
    assert entry["alert_devices"] == [str(agents[0].device.pk)]
    # The overview's counts, from the same rows in SQL.
    [counted] = [g for g in drift_reporting_groups() if g["group_id"] == group.pk]
    assert (counted["reporting"], counted["alerting"]) == (2, 1)


def test_ingest_keeps_the_latest_verdict_on_the_device(enroll: Any, make_version: Any) -> None:
    agent = enroll()
    now = timezone.now()
    empty = {"count": 0, "mean": [0.0] * 64, "m2": [0.0] * 64, "confidence_hist": [0] * 10}
    for end in (now, now - timedelta(minutes=10)):  # the second is an older window, re-sent late
        response = agent.post("drift", {**empty, "window_end": end.isoformat()})
        assert response.status_code == 200, response.content
    device = agent.refresh()
    assert device.drift_alert is False and device.drift_window_end == now


def test_the_board_gets_the_reference_bins_and_its_binned_counts_give_feature_psi(
    enroll: Any, make_regression_version: Any, operator_client: Any
) -> None:
    from models_registry.drift_reference import reference_sketch

    agent = enroll()
    version = make_regression_version()  # 8 features
    rng = np.random.default_rng(6)
    version.metrics = {"drift_reference": reference_sketch(inputs=rng.normal(size=(5_000, 8)))}
    version.save()
    first = agent.post("drift", {**_sketch(rng.normal(size=(300, 8)), np.zeros(0)), "version_id": version.pk})
    assert first.status_code == 200, first.content
    body = first.json()
    assert body["feature_psi"] is None and body["effect_size"] is not None and body["z_max"] is not None
    bins = body["feature_bins"]  # the first sketch was not counted over them: here they are
    assert bins["version_id"] == version.pk and bins["features"] == list(range(8))
    assert "counts" not in bins

    sketch = DriftSketch(num_features=8, feature_bins=bins)
    sketch.update(inputs=rng.normal(loc=1.0, size=(300, 8)), confidence=np.zeros(0))
    moved = agent.post("drift", {**sketch.to_dict(), "version_id": version.pk})
    assert moved.status_code == 200, moved.content
    answer = moved.json()
    assert answer["alert"] is True and answer["effect_size"] > 0.5
    assert answer["feature_psi"] > 0.25 and answer["psi_band"] == "major"
    assert "feature_bins" not in answer  # the board already counts over the current bins

    listed = operator_client.get("/api/v1/drift/reports/")
    assert listed.status_code == 200, listed.content
    [latest] = listed.json()["reports"]
    assert latest["id"] == answer["id"] and latest["alert"] is True
    assert latest["effect_size"] == pytest.approx(answer["effect_size"])
    assert latest["feature_psi"] == pytest.approx(answer["feature_psi"]) and latest["psi_band"] == "major"
    assert operator_client.get("/api/v1/drift/reports/?alert=false").json()["reports"] == []
    for query in ("group=x", "alert=maybe"):
        bad = operator_client.get(f"/api/v1/drift/reports/?{query}")
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "validation_error"


@pytest.mark.parametrize(
    "change",
    [
        {"feature_hist": [[1, 2]]},  # no bins_etag
        {"feature_hist": [[1, 2]], "bins_etag": ""},
        {"feature_hist": "x", "bins_etag": "e"},
        {"feature_hist": [[1] * 11], "bins_etag": "e"},
        {"feature_hist": [[]], "bins_etag": "e"},
        {"feature_hist": [[-1, 2]], "bins_etag": "e"},
        {"feature_hist": [[1, 2]] * 65, "bins_etag": "e"},
        {"feature_hist": [["a"]], "bins_etag": "e"},
    ],
)
def test_malformed_feature_histograms_are_refused(enroll: Any, change: dict[str, Any]) -> None:
    agent = enroll()
    response = agent.post("drift", {**_sketch(np.zeros((3, 4))), **change})
    assert response.status_code == 400, response.content
    assert response.json()["error"]["code"] == "validation_error"


def _boards(n: int) -> list[Any]:
    from fleet.models import Device

    return [Device.objects.create(name=f"drift-board-{i}", status="online") for i in range(n)]


def _feedback(device: Any, version: Any, *, n: int, correct: int) -> None:
    now = timezone.now()
    MetricSample.objects.bulk_create(
        MetricSample(
            device=device, version=version, name="correct", value=1.0 if i < correct else 0.0, ts=now
        )
        for i in range(n)
    )


def test_drift_check_flags_only_real_drops_with_enough_devices_and_samples(
    make_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    boards = _boards(4)
    few, lonely, steady, dropped = make_version(), make_version(), make_version(), make_version()
    for version in (few, lonely, steady, dropped):
        version.metrics = {"accuracy": 0.95}
        version.save()
    for board in boards[:3]:
        _feedback(board, few, n=50, correct=15)  # a big drop, but 150 samples in all
        _feedback(board, steady, n=100, correct=92)  # 0.92: within 0.05
        _feedback(board, dropped, n=100, correct=80)  # 0.80
    _feedback(boards[3], lonely, n=3000, correct=0)  # one device, however many samples
    with django_capture_on_commit_callbacks(execute=False) as emitted:
        assert drift_check() == [dropped.pk]
    assert len(emitted) == 1  # the model.flagged webhook, created after commit
    dropped.refresh_from_db()
    flag = dropped.metrics["flagged"]
    assert flag["reason"] == "accuracy_drop" and flag["accuracy"] == pytest.approx(0.8)
    assert flag["reference_accuracy"] == pytest.approx(0.95)
    assert flag["devices"] == 3 and flag["samples"] == 300
    for version in (few, lonely, steady):
        version.refresh_from_db()
        assert "flagged" not in version.metrics
    with django_capture_on_commit_callbacks(execute=False) as emitted:
        assert drift_check() == []  # idempotent: flagged once
    assert emitted == []


def test_old_feedback_does_not_count(make_version: Any) -> None:
    version = make_version()
    version.metrics = {"accuracy": 0.95}
    version.save()
    for board in _boards(3):
        _feedback(board, version, n=300, correct=0)
    assert drift_check(now=timezone.now() + timedelta(hours=2)) == []


@pytest.mark.parametrize("liar_correct", [0, 4000], ids=["liar reports failures", "liar reports successes"])
def test_one_poisoned_device_among_20_neither_raises_nor_hides_a_flag(
    make_version: Any, liar_correct: int
) -> None:
    boards = _boards(20)
    good, bad = make_version(), make_version()
    for version in (good, bad):
        version.metrics = {"accuracy": 0.95}
        version.save()
    for board in boards[:19]:
        _feedback(board, good, n=60, correct=57)  # 0.95
        _feedback(board, bad, n=60, correct=45)  # 0.75
    # Thousands of samples from one device: pooled, they would be most of the evidence
    # (0.95 would read 0.21 with the failures, 0.75 would read 0.94 with the successes).
    for version in (good, bad):
        _feedback(boards[19], version, n=4000, correct=liar_correct)
    assert drift_check() == [bad.pk]
    bad.refresh_from_db()
    assert bad.metrics["flagged"]["accuracy"] == pytest.approx(0.75)
    assert bad.metrics["flagged"]["devices"] == 20


def _abs_errors(device: Any, version: Any, values: Any) -> None:
    now = timezone.now()
    MetricSample.objects.bulk_create(
        MetricSample(device=device, version=version, name="abs_error", value=float(v), ts=now) for v in values
    )


def test_drift_check_flags_a_regression_version_whose_mae_rises(
    make_regression_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    boards = _boards(3)
    steady, risen = make_regression_version(), make_regression_version()
    for version in (steady, risen):
        version.metrics = {"mae": 0.4, "rmse": 0.5, "evaluation": "federated"}
        version.save()
    for board in boards:
        _abs_errors(board, steady, [0.48] * 100)  # +20 %: within the default 25 %
        _abs_errors(board, risen, [0.6] * 100)  # +50 %
        # Classification feedback says nothing about a regression version.
        _feedback(board, steady, n=100, correct=0)
    with django_capture_on_commit_callbacks(execute=False) as emitted:
        assert drift_check() == [risen.pk]
    assert len(emitted) == 1
    risen.refresh_from_db()
    flag = risen.metrics["flagged"]
    assert flag["reason"] == "mae_rise" and flag["metric"] == "mae"
    assert flag["mae"] == pytest.approx(0.6) and flag["reference_mae"] == pytest.approx(0.4)
    assert flag["value"] == pytest.approx(0.6) and flag["samples"] == 300 and flag["devices"] == 3
    steady.refresh_from_db()
    assert "flagged" not in steady.metrics


def test_mae_rise_threshold_is_a_setting(make_regression_version: Any, settings: Any) -> None:
    settings.DRIFT_MAE_RISE = 0.1
    version = make_regression_version()
    version.metrics = {"mae": 0.4}
    version.save()
    for board in _boards(3):
        _abs_errors(board, version, [0.48] * 100)
    assert drift_check() == [version.pk]


def test_device_minimums_are_settings(make_version: Any, settings: Any) -> None:
    settings.DRIFT_MIN_DEVICES = 1
    settings.DRIFT_MIN_SAMPLES = 100
    version = make_version()
    version.metrics = {"accuracy": 0.95}
    version.save()
    (board,) = _boards(1)
    _feedback(board, version, n=100, correct=50)
    settings.DRIFT_MIN_SAMPLES_PER_DEVICE = 101
    assert drift_check() == []
    settings.DRIFT_MIN_SAMPLES_PER_DEVICE = 100
    assert drift_check() == [version.pk]


def test_pages_read_the_counts_beat_made_and_count_themselves_without_them(enroll: Any) -> None:
    from django.core.cache import cache

    from fleet.selectors.drift import DRIFT_GROUPS_CACHE_KEY, drift_groups_counted

    group = DeviceGroup.objects.create(name="yard")
    agent = enroll()
    agent.device.groups.add(group)
    now = timezone.now()
    device_drift_latest(device_id=agent.device.pk, alert=True, window_end=now)
    fresh = drift_groups_counted()  # nothing counted by beat yet: counted now
    assert fresh["at"] is None and [(g["group"], g["alerting"]) for g in fresh["groups"]] == [("yard", 1)]
    drift_check(now=now)
    device_drift_latest(device_id=agent.device.pk, alert=False, window_end=now + timedelta(minutes=1))
    counted = drift_groups_counted()  # beat's counts, until its next check
    assert counted["at"] == now.isoformat() and counted["groups"][0]["alerting"] == 1
    cache.delete(DRIFT_GROUPS_CACHE_KEY)
    assert drift_groups_counted()["groups"][0]["alerting"] == 0
