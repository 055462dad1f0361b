"""A compact sketch of what a model sees on a board, for drift detection on the server.

Per input feature, count/mean/M2 by Welford's method (numerically stable, mergeable, and
constant in memory), plus a histogram of top-1 confidence. The sketch is sent as a small
JSON dict (`wire.DriftSketch`) and reset after it is sent.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

CONFIDENCE_BINS = 10


class DriftSketch:
    """Running per-feature moments of inputs and a histogram of top-1 confidence."""

    def __init__(self, *, num_features: int, bins: int = CONFIDENCE_BINS) -> None:
        """Start an empty sketch for inputs of `num_features` values."""
        self.num_features = num_features
        self.bins = bins
        self.reset()

    def reset(self) -> None:
        """Forget everything observed so far (called once a sketch has been sent)."""
        self.count = 0
        self.mean = np.zeros(self.num_features, dtype=np.float64)
        self.m2 = np.zeros(self.num_features, dtype=np.float64)
        self.histogram = np.zeros(self.bins, dtype=np.int64)

    def update(self, *, inputs: npt.ArrayLike, confidence: npt.ArrayLike) -> None:
        """Add a batch of inputs (rows of features) and their top-1 confidences."""
        batch = np.asarray(inputs, dtype=np.float64).reshape(-1, self.num_features)
        n = batch.shape[0]
        if n:
            # Chan et al.'s parallel combination of two Welford states: exact for a whole
            # batch at once, without the cancellation of a naive sum of squares.
            batch_mean = batch.mean(axis=0)
            batch_m2 = ((batch - batch_mean) ** 2).sum(axis=0)
            total = self.count + n
            delta = batch_mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + batch_m2 + delta**2 * (self.count * n / total)
            self.count = total
        conf = np.clip(np.asarray(confidence, dtype=np.float64).ravel(), 0.0, 1.0)
        # Confidence 1.0 falls in the last bin rather than past it.
        index = np.minimum((conf * self.bins).astype(np.int64), self.bins - 1)
        self.histogram += np.bincount(index, minlength=self.bins)

    def variance(self) -> npt.NDArray[np.float64]:
        """Population variance per feature (zeros while fewer than two rows were seen)."""
        if self.count < 2:
            return np.zeros(self.num_features, dtype=np.float64)
        return self.m2 / self.count

    def to_dict(self) -> dict[str, Any]:
        """The sketch as a JSON-ready dict (`wire.DriftSketch`), rounded to keep it small."""
        return {
            "count": int(self.count),
            "mean": [round(float(v), 5) for v in self.mean],
            "m2": [round(float(v), 4) for v in self.m2],
            "confidence_hist": [int(v) for v in self.histogram],
        }

    def take(self) -> dict[str, Any] | None:
        """The sketch as a dict and a reset, or None when nothing was observed."""
        if self.count == 0 and int(self.histogram.sum()) == 0:
            return None
        sketch = self.to_dict()
        self.reset()
        return sketch


# The sketch holds a mean and a spread per feature; past this many features an input is
# summarised per channel (its first axis), so the sketch stays small for any model.
MAX_FEATURES = 4096


def drift_features(x: npt.ArrayLike, input_shape: tuple[int, ...] | list[int]) -> npt.NDArray[np.float64]:
    """The features a drift sketch follows for a batch of inputs of ``input_shape``.

    Every value of an example when it has at most :data:`MAX_FEATURES`; otherwise the mean
    of each channel (the example's first axis), capped at :data:`MAX_FEATURES` channels.
    The server computes its reference with the same function.
    """
    batch = np.asarray(x, dtype=np.float64).reshape(-1, *[int(d) for d in input_shape])
    n = batch.shape[0]
    flat = batch.reshape(n, -1)
    if flat.shape[1] <= MAX_FEATURES:
        return flat
    channels = batch.reshape(n, batch.shape[1], -1).mean(axis=2) if batch.ndim > 2 else flat
    return channels[:, :MAX_FEATURES]
