"""Chart data for the dashboard, built on the server so browsers draw a few hundred points.

Pure Python: no Django, so it is tested and benchmarked on its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any


@dataclass(frozen=True)
class Bucket:
    """One time slot of a downsampled series."""

    start: datetime
    mean: float
    low: float
    high: float
    count: int


def downsample(points: Iterable[tuple[datetime, float]], *, buckets: int) -> list[Bucket]:
    """Average time-ordered `(ts, value)` points into at most `buckets` equal time slots.

    Slots without points are left out (a gap, not a zero). Non-finite values are skipped:
    one NaN from a device must not turn a whole slot into NaN.
    """
    if buckets < 1:
        raise ValueError("buckets must be at least 1")
    finite = [(ts, float(v)) for ts, v in points if v is not None and math.isfinite(v)]
    if not finite:
        return []
    finite.sort(key=lambda p: p[0])
    first, last = finite[0][0], finite[-1][0]
    span = (last - first).total_seconds()
    width = span / buckets if span > 0 else 1.0
    sums: dict[int, list[float]] = {}
    for ts, value in finite:
        # The last point would land in slot `buckets`; it belongs to the final slot.
        index = min(int((ts - first).total_seconds() / width), buckets - 1)
        slot = sums.setdefault(index, [0.0, math.inf, -math.inf, 0.0])
        slot[0] += value
        slot[1] = min(slot[1], value)
        slot[2] = max(slot[2], value)
        slot[3] += 1

    out = []
    for index in sorted(sums):
        total, low, high, count = sums[index]
        out.append(
            Bucket(
                start=first + timedelta(seconds=index * width),
                mean=total / count,
                low=low,
                high=high,
                count=int(count),
            )
        )
    return out


def line_spec(
    *,
    labels: Sequence[str],
    series: Sequence[dict[str, Any]],
    x_label: str = "",
    y_label: str = "",
    y_min: float | None = None,
    y_max: float | None = None,
    y2_label: str = "",
) -> dict[str, Any]:
    """A line chart the dashboard's script draws: category x axis, one or more series."""
    spec: dict[str, Any] = {"kind": "line", "labels": list(labels), "series": list(series)}
    for key, value in (("x_label", x_label), ("y_label", y_label), ("y2_label", y2_label)):
        if value:
            spec[key] = value
    if y_min is not None:
        spec["y_min"] = y_min
    if y_max is not None:
        spec["y_max"] = y_max
    return spec


def roc_spec(*, curves: Sequence[dict[str, Any] | None], auc: Sequence[float | None]) -> dict[str, Any]:
    """ROC curves (one per class, `{"fpr": [...], "tpr": [...]}`) plus the chance diagonal."""
    series: list[dict[str, Any]] = []
    for cls, curve in enumerate(curves):
        if not curve:
            continue
        area = auc[cls] if cls < len(auc) else None
        label = f"class {cls}" + (f" (AUC {area:.3f})" if area is not None else "")
        points = [{"x": x, "y": y} for x, y in zip(curve.get("fpr", []), curve.get("tpr", []), strict=False)]
        series.append({"label": label, "data": points})
    series.append(
        {"label": "chance", "data": [{"x": 0, "y": 0}, {"x": 1, "y": 1}], "color": "#9ca3af", "dash": True}
    )
    return {
        "kind": "scatter",
        "labels": [],
        "series": series,
        "x_label": "false positive rate",
        "y_label": "true positive rate",
        "y_min": 0,
        "y_max": 1,
    }


def heat_cells(matrix: Sequence[Sequence[int]]) -> list[list[dict[str, Any]]]:
    """A confusion matrix as table cells with a background shade per cell.

    Each row is normalised by its total (the class's recall view), so a rare class is as
    readable as a common one; the count stays in the cell.
    """
    rows: list[list[dict[str, Any]]] = []
    for r, row in enumerate(matrix):
        total = sum(row) or 1
        cells = []
        for c, count in enumerate(row):
            share = count / total
            # Diagonal cells are blue (right), others red (wrong); lightness follows the share.
            hue = 217 if r == c else 0
            lightness = 97 - int(55 * share)
            ink = "#fff" if lightness < 60 else "#111"
            cells.append(
                {
                    "count": count,
                    "share": share,
                    "style": f"background:hsl({hue},80%,{lightness}%);color:{ink}",
                }
            )
        rows.append(cells)
    return rows
