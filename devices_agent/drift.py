"""A compact sketch of what a model sees on a board, for drift detection on the server.

Per input feature, count/mean/M2 by Welford's method (numerically stable, mergeable, and
constant in memory), plus a histogram of top-1 confidence. Once the server has answered
a sketch with the reference's bins (`wire.DriftFeatureBins`: interior bin edges of up
to `wire.DRIFT_PSI_MAX_FEATURES` features, cut at the reference's deciles), the sketch
also counts those features' values in those bins, so the server can compute each one's
PSI against the reference. The sketch is sent as a small JSON dict (`wire.DriftSketch`)
and reset after it is sent; the bins stay.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

CONFIDENCE_BINS = 10


class DriftSketch:
    """Running per-feature moments of inputs and a histogram of top-1 confidence."""

    def __init__(
        self, *, num_features: int, bins: int = CONFIDENCE_BINS, feature_bins: dict[str, Any] | None = None
    ) -> None:
        """Start an empty sketch for inputs of `num_features` values.

        ``feature_bins`` (`wire.DriftFeatureBins`, from the server) adds per-feature
        histograms over the reference's bins; bins naming features past `num_features`
        are ignored.
        """
        self.num_features = num_features
        self.bins = bins
        self.feature_bins: dict[str, Any] | None = None
        self._bin_features: list[int] = []
        self._bin_edges: list[npt.NDArray[np.float64]] = []
        self.reset()
        if feature_bins is not None:
            self.set_feature_bins(feature_bins)

    def set_feature_bins(self, feature_bins: dict[str, Any] | None) -> None:
        """Count values in these reference bins from now on (None stops); starts the histograms afresh."""
        features = [int(f) for f in (feature_bins or {}).get("features", [])]
        edges = (feature_bins or {}).get("edges", [])
        if (
            feature_bins is None
            or len(features) != len(edges)
            or any(not 0 <= f < self.num_features for f in features)
        ):
            self.feature_bins, self._bin_features, self._bin_edges = None, [], []
        else:
            self.feature_bins = feature_bins
            self._bin_features = features
            self._bin_edges = [np.asarray(e, dtype=np.float64) for e in edges]
        self.feature_hist = [np.zeros(len(e) + 1, dtype=np.int64) for e in self._bin_edges]

    def reset(self) -> None:
        """Forget everything observed so far (called once a sketch has been sent)."""
        self.count = 0
        self.mean = np.zeros(self.num_features, dtype=np.float64)
        self.m2 = np.zeros(self.num_features, dtype=np.float64)
        self.histogram = np.zeros(self.bins, dtype=np.int64)
        self.feature_hist = [np.zeros(len(e) + 1, dtype=np.int64) for e in self._bin_edges]

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
            for i, (feature, edges) in enumerate(zip(self._bin_features, self._bin_edges, strict=True)):
                self.feature_hist[i] += bin_counts(values=batch[:, feature], edges=edges)
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
        sketch: dict[str, Any] = {
            "count": int(self.count),
            "mean": [round(float(v), 5) for v in self.mean],
            "m2": [round(float(v), 4) for v in self.m2],
            "confidence_hist": [int(v) for v in self.histogram],
        }
        if self.feature_bins is not None:
            sketch["feature_hist"] = [[int(v) for v in h] for h in self.feature_hist]
            sketch["bins_etag"] = str(self.feature_bins.get("etag", ""))
        return sketch

    def take(self) -> dict[str, Any] | None:
        """The sketch as a dict and a reset, or None when nothing was observed."""
        if self.count == 0 and int(self.histogram.sum()) == 0:
            return None
        sketch = self.to_dict()
        self.reset()
        return sketch


def bin_counts(*, values: npt.ArrayLike, edges: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """How many ``values`` fall in each bin cut by the sorted interior ``edges`` (len(edges) + 1 bins).

    Bin i holds edges[i-1] <= v < edges[i]; the first and last bins are open-ended, so
    values outside the reference's range still count. Board and server bin with this one
    function.
    """
    cut = np.asarray(edges, dtype=np.float64)
    index = np.searchsorted(cut, np.asarray(values, dtype=np.float64).ravel(), side="right")
    return np.bincount(index, minlength=len(cut) + 1).astype(np.int64)


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
