"""Pure drift scoring: a device's input/confidence sketch against its version's reference.

No Django here: sketches and references are plain dicts (`devices_agent.wire.DriftSketch`
shape: count, mean, m2, confidence_hist).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# Features that never vary in the reference (the border pixels of digits are always 0)
# would turn any shift into an infinite z; a floor on the spread keeps them comparable.
MIN_STD = 0.05
# Empty histogram bins would make PSI infinite; this stands for "almost never".
PSI_EPSILON = 1e-4


@dataclass(frozen=True)
class DriftScore:
    """How far a window strays from the reference, and whether that is an alert.

    Per feature, ``z`` says whether a shift is there at all (statistical significance:
    the shift over its standard error, which shrinks with the window's size) and two
    numbers say whether it matters: the effect size (the shift in reference standard
    deviations) and the feature's PSI over the reference's bins. A feature alerts when it
    is significant *and* (its effect size reaches ``effect_min`` or its PSI is major); a
    long window of a board whose inputs sit a hair off the reference is significant but
    no alert. The confidence histogram's PSI alerts on its own, from windows long enough
    for a PSI to mean something (``psi_min_samples``).
    """

    z_max: float  # largest per-feature z of the mean shift
    z_feature: int  # which feature that is
    psi: float | None  # PSI of the confidence histogram (None without a reference histogram)
    score: float  # >= 1 means alert (see drift_score)
    alert: bool
    effect_size: float = 0.0  # largest |mean - ref mean| / ref std over the features
    effect_feature: int = 0
    feature_psi: float | None = None  # largest per-feature PSI (None without binned counts)
    feature_psi_feature: int | None = None
    psi_band: str | None = None  # band of feature_psi: none, moderate, major
    alert_feature: int | None = None  # the feature that decided an alert by its shift


def mean_shift_z(*, sketch: dict[str, Any], reference: dict[str, Any]) -> np.ndarray:
    """Per-feature z of the window mean against the reference mean.

    The shift is divided by its standard error, from the reference spread (floored at
    `MIN_STD`) and the window's own, so a short window needs a larger shift to alert.
    """
    n = max(int(sketch["count"]), 1)
    ref_n = max(int(reference["count"]), 1)
    mean = np.asarray(sketch["mean"], dtype=np.float64)
    ref_mean = np.asarray(reference["mean"], dtype=np.float64)
    ref_var = np.maximum(np.asarray(reference["m2"], dtype=np.float64) / ref_n, MIN_STD**2)
    var = np.maximum(np.asarray(sketch["m2"], dtype=np.float64) / n, MIN_STD**2)
    stderr = np.sqrt(ref_var / ref_n + var / n)
    return np.abs(mean - ref_mean) / stderr


def effect_sizes(*, sketch: dict[str, Any], reference: dict[str, Any]) -> np.ndarray:
    """Per-feature standardized shift: |window mean - reference mean| / reference std.

    Unlike z it does not grow with the window: it says how big the shift is, in units
    of the reference's own spread (floored at `MIN_STD`, like z).
    """
    ref_n = max(int(reference["count"]), 1)
    mean = np.asarray(sketch["mean"], dtype=np.float64)
    ref_mean = np.asarray(reference["mean"], dtype=np.float64)
    ref_std = np.sqrt(np.maximum(np.asarray(reference["m2"], dtype=np.float64) / ref_n, MIN_STD**2))
    return np.abs(mean - ref_mean) / ref_std


def psi(*, observed: list[int] | np.ndarray, expected: list[int] | np.ndarray) -> float:
    """Population stability index between two histograms over the same bins.

    PSI = sum over bins of (p - q) * ln(p / q), p and q the observed and expected shares
    (floored at `PSI_EPSILON` so an empty bin is "almost never", not infinite).
    """
    obs = np.asarray(observed, dtype=np.float64)
    exp = np.asarray(expected, dtype=np.float64)
    p = np.maximum(obs / max(obs.sum(), 1.0), PSI_EPSILON)
    q = np.maximum(exp / max(exp.sum(), 1.0), PSI_EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


def psi_band(value: float | None, *, moderate: float, major: float) -> str | None:
    """The PSI band: "none" below ``moderate``, "moderate" up to ``major``, "major" above."""
    if value is None:
        return None
    if value > major:
        return "major"
    return "moderate" if value >= moderate else "none"


def feature_psis(*, sketch: dict[str, Any], reference: dict[str, Any]) -> dict[int, float]:
    """Per-feature PSI of the window's binned counts against the reference's, by feature index.

    Empty when the sketch was not counted over the reference's bins (no counts, another
    ``bins_etag``, or counts of another shape) or the window is empty.
    """
    bins = reference.get("feature_bins") or {}
    hist = sketch.get("feature_hist")
    if not bins or not hist or sketch.get("bins_etag") != bins.get("etag"):
        return {}
    features, ref_counts = bins.get("features") or [], bins.get("counts") or []
    if len(hist) != len(features) or len(ref_counts) != len(features):
        return {}
    out: dict[int, float] = {}
    for feature, observed, expected in zip(features, hist, ref_counts, strict=True):
        if len(observed) != len(expected) or sum(observed) == 0:
            continue
        out[int(feature)] = psi(observed=observed, expected=expected)
    return out


def drift_score(
    *,
    sketch: dict[str, Any],
    reference: dict[str, Any],
    z_alert: float,
    psi_alert: float,
    effect_min: float = 0.0,
    psi_moderate: float = 0.1,
    psi_major: float = 0.25,
    psi_min_samples: int = 0,
) -> DriftScore:
    """Score one window against the reference (see `DriftScore` for the rule).

    Per feature, the shift's score is min(z / z_alert, max(effect / effect_min,
    psi / psi_major)): at least 1 only when it is both significant and large (or its
    PSI major). The window's score is the largest of its features' and of the confidence
    PSI over ``psi_alert``; >= 1 is an alert. ``effect_min=0`` judges on z alone.

    A PSI (a feature's, or the confidence histogram's) decides only from a window of at
    least ``psi_min_samples`` inputs: PSI over few inputs is inflated by sampling noise
    alone (about (bins - 1) / n, and the largest of many features more), so a short
    window's PSI is reported but the window is judged on the effect size.
    """
    if int(sketch["count"]) > 0:
        z = mean_shift_z(sketch=sketch, reference=reference)
        effect = effect_sizes(sketch=sketch, reference=reference)
    else:
        z, effect = np.zeros(1), np.zeros(1)
    z_feature = int(np.argmax(z))
    effect_feature = int(np.argmax(effect))
    per_psi = feature_psis(sketch=sketch, reference=reference) if int(sketch["count"]) > 0 else {}
    psi_of = np.zeros(len(z))
    if int(sketch["count"]) >= psi_min_samples:
        for feature, value in per_psi.items():
            if feature < len(psi_of):
                psi_of[feature] = value
    size = effect / effect_min if effect_min > 0 else np.full(len(z), np.inf)
    matters = np.maximum(size, psi_of / psi_major if psi_major > 0 else 0.0)
    shift_scores = np.minimum(z / z_alert, matters)
    alert_feature = int(np.argmax(shift_scores))
    shift_score = float(shift_scores[alert_feature])

    psi_value: float | None = None
    ref_hist = reference.get("confidence_hist")
    if (
        ref_hist
        and sum(ref_hist) > 0
        and sum(sketch["confidence_hist"]) > 0
        and len(ref_hist) == len(sketch["confidence_hist"])
    ):
        psi_value = psi(observed=sketch["confidence_hist"], expected=ref_hist)
    # The confidence PSI, like a feature's, decides only from a window long enough for it
    # to be more than sampling noise.
    confident = psi_value is not None and sum(sketch["confidence_hist"]) >= psi_min_samples
    score = max(shift_score, (psi_value or 0.0) / psi_alert if confident else 0.0)
    top_psi = max(per_psi.items(), key=lambda kv: kv[1]) if per_psi else None
    return DriftScore(
        z_max=float(z[z_feature]),
        z_feature=z_feature,
        psi=psi_value,
        score=score,
        alert=score >= 1.0,
        effect_size=float(effect[effect_feature]),
        effect_feature=effect_feature,
        feature_psi=None if top_psi is None else float(top_psi[1]),
        feature_psi_feature=None if top_psi is None else int(top_psi[0]),
        psi_band=psi_band(None if top_psi is None else top_psi[1], moderate=psi_moderate, major=psi_major),
        alert_feature=alert_feature if shift_score >= 1.0 else None,
    )


def sketch_merge(total: dict[str, Any] | None, window: dict[str, Any]) -> dict[str, Any]:
    """Two sketches of the same features as one (Chan's parallel update of mean and M2).

    Histograms add up; per-feature counts only over the same bins (``bins_etag``): a
    window counted over other bins adds nothing to them, and the first window counted
    over bins gives the total its bins. ``total=None`` is the empty sketch.
    """
    n_b = int(window["count"])
    if total is not None and n_b == 0:
        return total
    mean_b, m2_b = np.asarray(window["mean"], dtype=np.float64), np.asarray(window["m2"], dtype=np.float64)
    if total is None or int(total["count"]) == 0:
        total, n_a, mean_a, m2_a = {}, 0, np.zeros_like(mean_b), np.zeros_like(m2_b)
    else:
        n_a = int(total["count"])
        mean_a, m2_a = np.asarray(total["mean"], dtype=np.float64), np.asarray(total["m2"], dtype=np.float64)
    n = n_a + n_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n) if n else mean_b
    m2 = m2_a + m2_b + delta**2 * (n_a * n_b / n) if n else m2_b
    hist_a, hist_b = total.get("confidence_hist") or [], window.get("confidence_hist") or []
    if len(hist_a) == len(hist_b):
        hist = [int(a) + int(b) for a, b in zip(hist_a, hist_b, strict=True)]
    else:
        hist = [int(v) for v in (hist_a or hist_b)]
    merged = {"count": n, "mean": mean.tolist(), "m2": m2.tolist(), "confidence_hist": hist}
    rows_a, rows_b = total.get("feature_hist"), window.get("feature_hist")
    etag = total.get("bins_etag")
    if rows_a and etag:
        if rows_b and window.get("bins_etag") == etag and _same_shape(rows_a, rows_b):
            rows_a = [
                [int(a) + int(b) for a, b in zip(ra, rb, strict=True)]
                for ra, rb in zip(rows_a, rows_b, strict=True)
            ]
        merged["feature_hist"], merged["bins_etag"] = rows_a, etag
    elif rows_b and window.get("bins_etag"):
        merged["feature_hist"] = [[int(v) for v in row] for row in rows_b]
        merged["bins_etag"] = window["bins_etag"]
    return merged


def _same_shape(a: list[list[int]], b: list[list[int]]) -> bool:
    return len(a) == len(b) and all(len(x) == len(y) for x, y in zip(a, b, strict=True))


def baseline_reference(*, baseline: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """A board's baseline sketch in the shape of a reference, to score its windows with.

    Its per-feature bins are the reference's, with the baseline's own counts over them
    when it has counts over the current bins (otherwise no feature PSI against it).
    """
    out: dict[str, Any] = {
        "count": int(baseline["count"]),
        "mean": baseline["mean"],
        "m2": baseline["m2"],
        "confidence_hist": baseline.get("confidence_hist") or [],
    }
    bins = reference.get("feature_bins") or {}
    if bins and baseline.get("feature_hist") and baseline.get("bins_etag") == bins.get("etag"):
        out["feature_bins"] = {**bins, "counts": baseline["feature_hist"]}
    return out
