"""Order-statistics rules: coordinate-wise median, trimmed mean and (multi-)Krum.

They need every update at once, so they cannot be merged from partial sums
(``mergeable = False``). To keep memory at ``n_updates x chunk`` instead of
``n_updates x model`` they read updates through an :class:`~.base.UpdateSource`, one
flat slice of one tensor at a time.

Client-reported weights (example counts) are deliberately ignored: a robust rule must not
let one device gain influence by claiming a huge dataset.

Differential-privacy noise does not fit them: its scale is calibrated to how far one
clipped update can move a mean, so they refuse a :class:`~.privacy.Privacy` that adds
noise. A clip norm alone is accepted and not re-applied: updates above the job's norm
bound were refused on arrival, and an order statistic already limits what one update
can do.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from .base import (
    DEFAULT_CHUNK,
    Array,
    InMemoryUpdateSource,
    NoServerState,
    UpdateSource,
    Weights,
    as_float32,
    check_update,
    check_weight,
    iter_chunks,
    shapes_of,
)
from .privacy import Privacy


class _OrderStatistic(NoServerState):
    """Collects updates in memory for :meth:`finalize`, or aggregates straight from a
    source with :meth:`finalize_source` (the chunked path for large rounds)."""

    name = "order_statistic"
    mergeable = False

    def __init__(
        self,
        *,
        global_weights: Mapping[str, npt.ArrayLike],
        chunk: int = DEFAULT_CHUNK,
        privacy: Privacy | None = None,
    ) -> None:
        if privacy is not None and privacy.adds_noise:
            raise ValueError(
                f"{self.name} cannot add differential-privacy noise: the noise is calibrated to a "
                "mean of clipped updates; use fedavg, fedprox, fedadam or fedyogi"
            )
        if chunk < 1:
            raise ValueError("chunk must be >= 1")
        self.global_weights: Weights = as_float32(global_weights)
        self.shapes = shapes_of(self.global_weights)
        self.chunk = chunk
        self.accepted_ids: set[str] = set()
        # Kept by reference: in-memory use is for small rounds; large ones pass a source.
        self._updates: list[Mapping[str, npt.ArrayLike]] = []

    @property
    def num_accepted(self) -> int:
        """How many updates were collected."""
        return len(self._updates)

    def accept(
        self,
        update: Mapping[str, npt.ArrayLike],
        *,
        weight: float = 1.0,
        update_id: str | None = None,
    ) -> bool:
        """Collect one validated delta (the weight is checked but not used)."""
        if update_id is not None and update_id in self.accepted_ids:
            return False
        check_weight(weight)
        check_update(update, self.shapes)
        self._updates.append(update)
        if update_id is not None:
            self.accepted_ids.add(update_id)
        return True

    def merge(self, other: object) -> None:
        """Order statistics cannot be combined from partial results."""
        raise TypeError(f"{self.name} is not mergeable; aggregate all updates in one place")

    def checkpoint(self) -> bytes:
        """There is no running aggregate to save: the rule needs every update at once."""
        raise TypeError(f"{self.name} is not mergeable; it has no checkpoint")

    def resume(self, data: bytes) -> None:
        """See :meth:`checkpoint`."""
        raise TypeError(f"{self.name} is not mergeable; it has no checkpoint")

    def finalize(self) -> Weights:
        """New global weights from the collected updates."""
        return self.finalize_source(InMemoryUpdateSource(self._updates))

    def finalize_source(self, source: UpdateSource) -> Weights:
        """New global weights from every update in ``source``, chunk by chunk."""
        if source.num_updates == 0:
            raise ValueError("no updates were accepted")
        self._prepare(source)
        out: Weights = {}
        for name, shape in self.shapes.items():
            out[name] = np.empty(math.prod(shape), dtype=np.float32)
        for name, start, stop in iter_chunks(self.shapes, self.chunk):
            block = source.read(name, start, stop)
            if block.shape != (source.num_updates, stop - start):
                raise ValueError(f"source returned shape {block.shape} for {name!r}")
            combined = self._combine(block)
            base = self.global_weights[name].ravel()[start:stop].astype(np.float64)
            out[name][start:stop] = base + combined
        return {name: out[name].reshape(shape) for name, shape in self.shapes.items()}

    def _prepare(self, source: UpdateSource) -> None:
        """Hook for rules that need a first pass over the source."""

    def _combine(self, block: Array) -> npt.NDArray[np.float64]:
        raise NotImplementedError


class CoordinateMedianAggregator(_OrderStatistic):
    """Coordinate-wise median of the deltas (Yin et al. 2018)."""

    name = "median"

    def _combine(self, block: Array) -> npt.NDArray[np.float64]:
        # The block is ours (sources return fresh arrays): partition it in place rather
        # than copying n x chunk values again.
        return np.asarray(np.median(block, axis=0, overwrite_input=True), dtype=np.float64)


class TrimmedMeanAggregator(_OrderStatistic):
    """Coordinate-wise trimmed mean: drop the ``floor(beta * n)`` smallest and largest
    values of every coordinate, average the rest (as ``scipy.stats.trim_mean``)."""

    name = "trimmed_mean"

    def __init__(
        self,
        *,
        global_weights: Mapping[str, npt.ArrayLike],
        beta: float = 0.1,
        chunk: int = DEFAULT_CHUNK,
        privacy: Privacy | None = None,
    ) -> None:
        if not 0.0 <= beta < 0.5:
            raise ValueError("beta must be in [0, 0.5)")
        super().__init__(global_weights=global_weights, chunk=chunk, privacy=privacy)
        self.beta = beta

    def _combine(self, block: Array) -> npt.NDArray[np.float64]:
        n = block.shape[0]
        cut = int(self.beta * n)
        if 2 * cut >= n:
            raise ValueError(f"beta={self.beta} trims every one of {n} updates")
        block.sort(axis=0)  # in place: the block is ours
        return np.asarray(block[cut : n - cut].mean(axis=0, dtype=np.float64))


class KrumAggregator(_OrderStatistic):
    """(Multi-)Krum (Blanchard et al. 2017): score every update by the summed squared
    distances to its ``n - f - 2`` nearest neighbours, keep the ``m`` lowest scores and
    average them (``m = 1`` is classic Krum).

    Distances are accumulated chunk by chunk (first pass over the source), the selected
    updates are averaged in a second pass. After finalizing, :attr:`selected` holds the
    chosen update indices and :attr:`scores` every score.
    """

    name = "krum"

    def __init__(
        self,
        *,
        global_weights: Mapping[str, npt.ArrayLike],
        f: int = 0,
        m: int = 1,
        chunk: int = DEFAULT_CHUNK,
        privacy: Privacy | None = None,
    ) -> None:
        if f < 0 or m < 1:
            raise ValueError("need f >= 0 and m >= 1")
        super().__init__(global_weights=global_weights, chunk=chunk, privacy=privacy)
        self.f = f
        self.m = m
        self.selected: npt.NDArray[np.intp] = np.empty(0, dtype=np.intp)
        self.scores: npt.NDArray[np.float64] = np.empty(0, dtype=np.float64)

    def _prepare(self, source: UpdateSource) -> None:
        n = source.num_updates
        if n < 2 * self.f + 3:
            raise ValueError(f"Krum with f={self.f} needs at least {2 * self.f + 3} updates")
        if self.m > n - self.f:
            raise ValueError(f"cannot keep m={self.m} of {n} updates with f={self.f}")
        dist = self.pairwise_sq_distances(source)
        neighbours = n - self.f - 2
        scores = np.empty(n, dtype=np.float64)
        for i in range(n):
            others = np.delete(dist[i], i)
            scores[i] = np.partition(others, neighbours - 1)[:neighbours].sum()
        self.scores = scores
        # Stable sort so ties resolve to the lowest index, deterministically.
        self.selected = np.sort(np.argsort(scores, kind="stable")[: self.m])

    def pairwise_sq_distances(self, source: UpdateSource) -> npt.NDArray[np.float64]:
        """Squared Euclidean distances between all updates, summed over chunks."""
        n = source.num_updates
        dist = np.zeros((n, n), dtype=np.float64)
        for name, start, stop in iter_chunks(self.shapes, self.chunk):
            block = source.read(name, start, stop).astype(np.float64)
            sq = np.einsum("ij,ij->i", block, block)
            # ||a-b||^2 = ||a||^2 + ||b||^2 - 2ab through one matrix product per chunk;
            # float64 keeps the cancellation error far below any real distance.
            dist += sq[:, None] + sq[None, :] - 2.0 * (block @ block.T)
        np.maximum(dist, 0.0, out=dist)
        np.fill_diagonal(dist, 0.0)
        return dist

    def _combine(self, block: Array) -> npt.NDArray[np.float64]:
        return np.asarray(block[self.selected].mean(axis=0, dtype=np.float64))
