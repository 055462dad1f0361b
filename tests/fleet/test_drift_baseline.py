"""Drift against each board's own baseline: a board that differs from the reference for good
is not drifting; one whose inputs move from what they were is, when they also stray from the
reference."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from devices_agent.drift import DriftSketch
from fleet.drift import sketch_merge
from fleet.models import DriftBaseline, DriftReport

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.fleet.urls")]

FEATURES = 8


def _sketch(x: np.ndarray, bins: dict[str, Any] | None = None) -> dict[str, Any]:
    sketch = DriftSketch(num_features=x.shape[1], feature_bins=bins)
    sketch.update(inputs=x, confidence=np.zeros(0))
    return sketch.to_dict()


@pytest.fixture
def version(make_regression_version: Any) -> Any:
    from models_registry.drift_reference import reference_sketch

    made = make_regression_version()  # 8 features
    rng = np.random.default_rng(0)
    made.metrics = {"drift_reference": reference_sketch(inputs=rng.normal(size=(5_000, FEATURES)))}
    made.save()
    return made


def _post(agent: Any, version: Any, x: np.ndarray) -> dict[str, Any]:
    response = agent.post("drift", {**_sketch(x), "version_id": version.pk})
    assert response.status_code == 200, response.content
    return dict(response.json())


def test_a_board_unlike_the_reference_is_judged_against_its_own_first_windows(
    enroll: Any, version: Any, settings: Any
) -> None:
    settings.DRIFT_BASELINE_SAMPLES = 400
    agent = enroll()
    rng = np.random.default_rng(1)
    # A board whose inputs sit 1.5 reference std off on every feature, from its first day.
    local = lambda n: rng.normal(loc=1.5, size=(n, FEATURES))  # noqa: E731
    first, second = _post(agent, version, local(250)), _post(agent, version, local(250))
    for answer in (first, second):  # its baseline: far from the reference, and no alert
        assert answer["effect_size"] > 1.0 and answer["baseline_score"] is None and not answer["alert"]
    baseline = DriftBaseline.objects.get(device=agent.device, version=version)
    assert baseline.complete and baseline.windows == 2 and baseline.sketch["count"] == 500

    steady = _post(agent, version, local(300))
    assert steady["effect_size"] > 1.0  # still far from the reference ...
    assert steady["baseline_effect_size"] < 0.5 and steady["baseline_score"] < 1.0  # ... as it always was
    assert steady["alert"] is False

    moved = _post(agent, version, rng.normal(loc=2.5, size=(300, FEATURES)))
    assert moved["baseline_effect_size"] > 0.5 and moved["alert"] is True
    report = DriftReport.objects.get(pk=moved["id"])
    assert report.alert and report.baseline_score is not None and report.baseline_score >= 1.0

    # Back towards the reference: it moved from its baseline, but onto what the version was
    # trained on, which is no reason to act.
    home = _post(agent, version, rng.normal(loc=0.0, size=(300, FEATURES)))
    assert home["baseline_effect_size"] > 0.5 and home["effect_size"] < 0.5 and home["alert"] is False


def test_each_version_gets_a_baseline_of_its_own(
    enroll: Any, version: Any, make_regression_version: Any, settings: Any
) -> None:
    settings.DRIFT_BASELINE_SAMPLES = 200
    agent = enroll()
    rng = np.random.default_rng(2)
    _post(agent, version, rng.normal(size=(200, FEATURES)))
    drifted = rng.normal(loc=1.5, size=(300, FEATURES))
    assert _post(agent, version, drifted)["alert"] is True
    # A new version (retrained on where the board is now) starts a new baseline there.
    newer = make_regression_version()
    newer.metrics = version.metrics
    newer.save()
    assert _post(agent, newer, drifted)["baseline_score"] is None
    later = _post(agent, newer, rng.normal(loc=1.5, size=(300, FEATURES)))
    assert later["baseline_score"] is not None and later["alert"] is False
    assert DriftBaseline.objects.filter(device=agent.device).count() == 2


def test_a_zero_baseline_judges_against_the_reference_alone(enroll: Any, version: Any, settings: Any) -> None:
    settings.DRIFT_BASELINE_SAMPLES = 0
    agent = enroll()
    rng = np.random.default_rng(3)
    answer = _post(agent, version, rng.normal(loc=1.5, size=(300, FEATURES)))
    assert answer["alert"] is True and answer["baseline_score"] is None
    assert not DriftBaseline.objects.exists()


def test_empty_windows_do_not_make_a_baseline(enroll: Any, version: Any, settings: Any) -> None:
    settings.DRIFT_BASELINE_SAMPLES = 100
    agent = enroll()
    empty = {"count": 0, "mean": [0.0] * FEATURES, "m2": [0.0] * FEATURES, "confidence_hist": [0] * 10}
    for _ in range(3):
        response = agent.post("drift", {**empty, "version_id": version.pk})
        assert response.status_code == 200, response.content
    assert not DriftBaseline.objects.get(device=agent.device, version=version).complete


def test_merged_sketches_equal_the_sketch_of_all_their_inputs() -> None:
    rng = np.random.default_rng(4)
    a, b, c = rng.normal(size=(50, 4)), rng.normal(loc=2.0, scale=3.0, size=(70, 4)), rng.normal(size=(1, 4))
    bins = {"etag": "e1", "features": [0, 1, 2, 3], "edges": [[-1.0, 0.0, 1.0]] * 4}
    other = {**bins, "etag": "e2"}
    merged = sketch_merge(
        sketch_merge(sketch_merge(None, _sketch(a, bins)), _sketch(b, bins)), _sketch(c, other)
    )
    whole = _sketch(np.concatenate([a, b, c]))
    assert merged["count"] == 121
    np.testing.assert_allclose(merged["mean"], whole["mean"], rtol=1e-4, atol=1e-4)  # sketches travel rounded
    np.testing.assert_allclose(merged["m2"], whole["m2"], rtol=1e-4, atol=1e-4)  # sketches travel rounded
    # Per-feature counts add up over the same bins only: c was counted over others.
    expected = np.asarray(_sketch(a, bins)["feature_hist"]) + np.asarray(_sketch(b, bins)["feature_hist"])
    assert merged["bins_etag"] == "e1" and np.array_equal(merged["feature_hist"], expected)
    assert sketch_merge(merged, {**_sketch(a[:0])}) is merged  # an empty window changes nothing


def test_short_windows_wait_for_the_boards_next_and_are_judged_together(
    enroll: Any, version: Any, settings: Any
) -> None:
    settings.DRIFT_BASELINE_SAMPLES = 200
    settings.DRIFT_WINDOW_MIN_SAMPLES = 100
    agent = enroll()
    rng = np.random.default_rng(5)
    _post(agent, version, rng.normal(size=(200, FEATURES)))  # the baseline
    moved = lambda: rng.normal(loc=1.5, size=(40, FEATURES))  # noqa: E731
    first, second = _post(agent, version, moved()), _post(agent, version, moved())
    for answer in (first, second):  # scored on their own against the reference, not judged
        assert answer["effect_size"] > 1.0 and answer["baseline_score"] is None and not answer["alert"]
    pending = DriftBaseline.objects.get(device=agent.device, version=version).pending
    assert pending["count"] == 80
    third = _post(agent, version, moved())  # 120 inputs: judged, the three together
    assert third["alert"] is True and third["baseline_effect_size"] > 1.0
    assert DriftBaseline.objects.get(device=agent.device, version=version).pending == {}
