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
    """How far a window strays from the reference, and whether that is an alert."""

    z_max: float  # largest per-feature z of the mean shift
    z_feature: int  # which feature that is
    psi: float | None  # PSI of the confidence histogram (None without a reference histogram)
    score: float  # the larger of z_max / z_alert and psi / psi_alert; >= 1 means alert
    alert: bool


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


def psi(*, observed: list[int] | np.ndarray, expected: list[int] | np.ndarray) -> float:
    """Population stability index between two histograms over the same bins."""
    obs = np.asarray(observed, dtype=np.float64)
    exp = np.asarray(expected, dtype=np.float64)
    p = np.maximum(obs / max(obs.sum(), 1.0), PSI_EPSILON)
    q = np.maximum(exp / max(exp.sum(), 1.0), PSI_EPSILON)
    return float(np.sum((p - q) * np.log(p / q)))


def drift_score(
    *, sketch: dict[str, Any], reference: dict[str, Any], z_alert: float, psi_alert: float
) -> DriftScore:
    """Score one window against the reference; alert when either measure is over its threshold."""
    z = mean_shift_z(sketch=sketch, reference=reference) if int(sketch["count"]) > 0 else np.zeros(1)
    z_feature = int(np.argmax(z))
    z_max = float(z[z_feature])
    psi_value: float | None = None
    ref_hist = reference.get("confidence_hist")
    if (
        ref_hist
        and sum(ref_hist) > 0
        and sum(sketch["confidence_hist"]) > 0
        and len(ref_hist) == len(sketch["confidence_hist"])
    ):
        psi_value = psi(observed=sketch["confidence_hist"], expected=ref_hist)
    score = max(z_max / z_alert, (psi_value or 0.0) / psi_alert)
    return DriftScore(z_max=z_max, z_feature=z_feature, psi=psi_value, score=score, alert=score >= 1.0)
