"""The personalisation summary: latest accuracies per device and version, gains per group."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from fleet.models import DeviceGroup, MetricSample
from fleet.selectors.personalisation import personalisation_summary

pytestmark = pytest.mark.django_db


def _sample(device: Any, version: Any, name: str, value: float, minutes_ago: float) -> None:
    MetricSample.objects.create(
        device=device,
        version=version,
        name=name,
        value=value,
        ts=timezone.now() - timedelta(minutes=minutes_ago),
    )


@pytest.fixture
def fleet_with_samples(enroll: Any, make_version: Any) -> dict[str, Any]:
    v1, v2 = make_version(), make_version()
    lab, field = DeviceGroup.objects.create(name="lab"), DeviceGroup.objects.create(name="field")
    a, b, c, d = (enroll().device for _ in range(4))
    a.groups.add(lab)
    b.groups.add(lab)
    c.groups.add(field)
    # a: an old reading on v1, then v2 where the later personal value replaces the earlier one.
    _sample(a, v1, "global_accuracy", 0.5, 30)
    _sample(a, v1, "personal_accuracy", 0.9, 30)
    _sample(a, v2, "global_accuracy", 0.8, 10)
    _sample(a, v2, "personal_accuracy", 0.7, 10)
    _sample(a, v2, "personal_accuracy", 0.95, 5)
    # b: gain of -0.1 on v1.
    _sample(b, v1, "global_accuracy", 0.6, 20)
    _sample(b, v1, "personal_accuracy", 0.5, 20)
    # c: only one of the two numbers, so no row.
    _sample(c, v2, "global_accuracy", 0.7, 3)
    # d: in no group, gain 0.2; other metric names are ignored.
    _sample(d, v2, "global_accuracy", 0.4, 2)
    _sample(d, v2, "personal_accuracy", 0.6, 2)
    _sample(d, v2, "accuracy", 0.1, 1)
    return {"a": a, "b": b, "c": c, "d": d, "lab": lab, "field": field, "v2": v2}


def test_selector_takes_latest_values_of_newest_complete_version(fleet_with_samples: dict[str, Any]) -> None:
    f = fleet_with_samples
    summary = personalisation_summary()
    rows = {row["device_id"]: row for row in summary["devices"]}
    assert set(rows) == {str(f["a"].pk), str(f["b"].pk), str(f["d"].pk)}
    a = rows[str(f["a"].pk)]
    assert a["version_id"] == f["v2"].pk
    assert a["global_accuracy"] == pytest.approx(0.8) and a["personal_accuracy"] == pytest.approx(0.95)
    assert a["gain"] == pytest.approx(0.15)
    assert rows[str(f["b"].pk)]["gain"] == pytest.approx(-0.1)
    groups = {g["group"]: g for g in summary["groups"]}
    assert set(groups) == {"lab", None}
    assert groups["lab"]["devices"] == 2 and groups["lab"]["mean_gain"] == pytest.approx(0.025)
    assert groups[None]["devices"] == 1 and groups[None]["mean_gain"] == pytest.approx(0.2)


def test_endpoint_filters_by_group_id_or_name(fleet_with_samples: dict[str, Any], viewer_client: Any) -> None:
    f = fleet_with_samples
    by_id = viewer_client.get(f"/api/v1/personalisation/?group={f['lab'].pk}")
    assert by_id.status_code == 200, by_id.content
    by_name = viewer_client.get("/api/v1/personalisation/?group=lab")
    assert by_name.json() == by_id.json()
    body = by_id.json()
    assert sorted(r["device_id"] for r in body["devices"]) == sorted([str(f["a"].pk), str(f["b"].pk)])
    [lab] = body["groups"]
    assert lab["group_id"] == f["lab"].pk and lab["devices"] == 2
    assert lab["mean_gain"] == pytest.approx(0.025)
    field = viewer_client.get("/api/v1/personalisation/?group=field").json()
    assert field == {"devices": [], "groups": []}


def test_anonymous_is_refused(anon_client: Any) -> None:
    response = anon_client.get("/api/v1/personalisation/")
    assert response.status_code in (401, 403)
    assert "error" in response.json()


def test_gain_on_mae_is_global_minus_personal_and_named(
    enroll: Any, make_version: Any, make_regression_version: Any, viewer_client: Any
) -> None:
    digits, sensor = make_version(), make_regression_version()
    lab = DeviceGroup.objects.create(name="lab")
    a, b, c = (enroll().device for _ in range(3))
    for device in (a, b, c):
        device.groups.add(lab)
    # a, b: regression boards; the personal head's error is lower, so the gain is positive.
    _sample(a, sensor, "global_mae", 0.50, 5)
    _sample(a, sensor, "personal_mae", 0.30, 5)
    _sample(b, sensor, "global_mae", 0.40, 5)
    _sample(b, sensor, "personal_mae", 0.45, 5)
    # Accuracy names on a regression version are not its metric: they are ignored.
    _sample(b, sensor, "global_accuracy", 0.1, 1)
    _sample(b, sensor, "personal_accuracy", 0.9, 1)
    # c: a classification board in the same group.
    _sample(c, digits, "global_accuracy", 0.7, 5)
    _sample(c, digits, "personal_accuracy", 0.8, 5)
    summary = personalisation_summary()
    rows = {row["device_id"]: row for row in summary["devices"]}
    ra, rb, rc = rows[str(a.pk)], rows[str(b.pk)], rows[str(c.pk)]
    assert ra["metric"] == "mae" and ra["gain"] == pytest.approx(0.2)
    assert ra["global"] == pytest.approx(0.5) and ra["personal_mae"] == pytest.approx(0.3)
    assert rb["metric"] == "mae" and rb["gain"] == pytest.approx(-0.05)
    assert rc["metric"] == "accuracy" and rc["gain"] == pytest.approx(0.1)
    groups = {(g["group"], g["metric"]): g for g in summary["groups"]}
    assert set(groups) == {("lab", "accuracy"), ("lab", "mae")}
    assert groups[("lab", "mae")]["devices"] == 2
    assert groups[("lab", "mae")]["mean_gain"] == pytest.approx(0.075)
    assert groups[("lab", "accuracy")]["mean_gain"] == pytest.approx(0.1)
    body = viewer_client.get("/api/v1/personalisation/?group=lab").json()
    assert {(g["metric"], round(g["mean_gain"], 4)) for g in body["groups"]} == {
        ("accuracy", 0.1),
        ("mae", 0.075),
    }
