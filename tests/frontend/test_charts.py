"""Chart data built on the server: pure functions, no database."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import pytest

from frontend.charts import downsample, heat_cells, roc_spec

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_downsample_averages_into_at_most_the_requested_slots() -> None:
    points = [(T0 + timedelta(seconds=i), float(i % 10)) for i in range(10_000)]
    buckets = downsample(points, buckets=100)
    assert len(buckets) == 100
    assert sum(b.count for b in buckets) == 10_000
    # Every slot holds whole cycles of 0..9: the mean is 4.5, the range 0..9.
    assert all(b.mean == pytest.approx(4.5, abs=0.1) and b.low == 0 and b.high == 9 for b in buckets)
    assert buckets[0].start == T0


def test_downsample_leaves_gaps_and_skips_non_finite_values() -> None:
    points = [(T0, 1.0), (T0 + timedelta(seconds=1), math.nan), (T0 + timedelta(seconds=99), 3.0)]
    buckets = downsample(points, buckets=10)
    assert [(b.mean, b.count) for b in buckets] == [(1.0, 1), (3.0, 1)]
    assert downsample([], buckets=10) == []
    assert downsample([(T0, 2.0)], buckets=10)[0].mean == 2.0
    with pytest.raises(ValueError):
        downsample(points, buckets=0)


def test_heat_cells_shade_by_row_share() -> None:
    cells = heat_cells([[9, 1], [0, 0]])
    assert [c["count"] for c in cells[0]] == [9, 1]
    assert cells[0][0]["share"] == pytest.approx(0.9)
    assert "hsl(217" in cells[0][0]["style"] and "hsl(0" in cells[0][1]["style"]
    assert cells[1][0]["share"] == 0  # an empty row does not divide by zero


def test_roc_spec_skips_undefined_classes_and_adds_chance() -> None:
    spec = roc_spec(curves=[{"fpr": [0, 1], "tpr": [0, 1]}, None], auc=[0.5, None])
    assert [s["label"] for s in spec["series"]] == ["class 0 (AUC 0.500)", "chance"]
    assert spec["series"][0]["data"] == [{"x": 0, "y": 0}, {"x": 1, "y": 1}]
