"""Streaming weighted mean of updates (FedAvg), mergeable and resumable.

FedProx needs nothing different on the server: its proximal term lives in the clients'
local objective, so the server side of FedProx is exactly this weighted mean.

With a :class:`~.privacy.Privacy` the mean is DP-FedAvg's: updates are clipped on
arrival, counted with equal weights when noise is asked for, and the noise is added to
the mean delta before it is applied.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .base import NoServerState, UpdateSource, Weights, as_float32, check_update, check_weight, shapes_of
from .privacy import Privacy

PARTIAL_KIND = "weighted_mean"
PARTIAL_VERSION = "1"
_SUM_PREFIX = "sum::"
# Elements per block of the weighted accumulate and the final division (1 MiB of
# float32 scratch): large enough that the per-block Python overhead is negligible.
_BLOCK = 262_144


class WeightedMeanAggregator(NoServerState):
    """FedAvg: new weights = global + sum(w_i * delta_i) / sum(w_i).

    Memory is O(model size) whatever the number of updates: one float64 running sum
    per tensor (float64 because summing thousands of float32 deltas in float32 loses
    the small ones), one float64 scratch buffer, the total weight and the set of
    accepted update ids. The list of updates is never kept.
    """

    name = "fedavg"
    mergeable = True

    def __init__(
        self, *, global_weights: Mapping[str, npt.ArrayLike], privacy: Privacy | None = None
    ) -> None:
        self.privacy = privacy
        self.global_weights: Weights = as_float32(global_weights)
        self.shapes = shapes_of(self.global_weights)
        self.sums: dict[str, npt.NDArray[np.float64]] = {
            name: np.zeros(shape, dtype=np.float64) for name, shape in self.shapes.items()
        }
        self.total_weight = 0.0
        self.count = 0
        self.accepted_ids: set[str] = set()
        # Small fixed scratch for weight * delta: it stays in the CPU cache and keeps
        # the extra memory constant instead of one model-sized temporary per update.
        self._scratch = np.empty(_BLOCK, dtype=np.float32)

    @property
    def num_accepted(self) -> int:
        """How many updates were added (directly or through merges)."""
        return self.count

    def accept(
        self,
        update: Mapping[str, npt.ArrayLike],
        *,
        weight: float = 1.0,
        update_id: str | None = None,
    ) -> bool:
        """Add ``weight * update`` to the running sums.

        ``update`` must be a validated delta (see ``devices_agent.codecs.decode_delta``)
        with exactly the model's names and shapes. Returns False, changing nothing, when
        ``update_id`` was already accepted, so a retried task never counts twice. Under
        :attr:`privacy` the update is clipped first, and with noise its weight is 1.
        """
        if update_id is not None and update_id in self.accepted_ids:
            return False
        w = check_weight(weight)
        check_update(update, self.shapes)
        if self.privacy is not None:
            update = self.privacy.clip(update)
            if self.privacy.adds_noise:
                # The noise is calibrated to one participant moving an equal-weight mean
                # by at most clip_norm / n; example counts would break that bound.
                w = 1.0
        w32 = np.float32(w)
        for name, total in self.sums.items():
            flat_total = total.reshape(-1)
            flat = np.asarray(update[name]).reshape(-1)
            if w == 1.0:
                # Mixed-dtype add casts float32 -> float64 in numpy's small internal
                # buffers, so no model-sized temporary is created.
                np.add(flat_total, flat, out=flat_total)
                continue
            # weight * delta is formed in float32 (numpy's fast SIMD loop; the rounding,
            # 2^-24 relative, is below the precision the device sent) and added into the
            # float64 sum, which is where precision matters over thousands of updates.
            # Block by block through a small cached scratch: no allocation per update.
            for start in range(0, flat.size, _BLOCK):
                stop = min(start + _BLOCK, flat.size)
                scratch = self._scratch[: stop - start]
                np.multiply(flat[start:stop], w32, out=scratch)
                np.add(flat_total[start:stop], scratch, out=flat_total[start:stop])
        self.total_weight += w
        self.count += 1
        if update_id is not None:
            self.accepted_ids.add(update_id)
        return True

    def merge(self, other: object) -> None:
        """Fold another partial aggregate (a weighted mean) of the same model into this one.

        Raises ``ValueError`` when both partials accepted the same update id, because
        the sums cannot be un-added and the update would otherwise count twice.
        """
        if not isinstance(other, WeightedMeanAggregator):
            raise TypeError(f"cannot merge {type(other).__name__} into a weighted mean")
        if other.shapes != self.shapes:
            raise ValueError("cannot merge partial aggregates of different models")
        overlap = self.accepted_ids & other.accepted_ids
        if overlap:
            raise ValueError(f"update ids counted in both partials: {sorted(overlap)[:5]}")
        for name, total in self.sums.items():
            np.add(total, other.sums[name], out=total)
        self.total_weight += other.total_weight
        self.count += other.count
        self.accepted_ids |= other.accepted_ids

    def checkpoint(self) -> bytes:
        """The running sums and their ids as safetensors bytes (see :func:`partial_to_bytes`)."""
        return partial_to_bytes(self)

    def resume(self, data: bytes) -> None:
        """Fold in a :meth:`checkpoint` of the same round."""
        self.merge(partial_from_bytes(data, global_weights=self.global_weights))

    def mean_delta(self) -> Weights:
        """The weighted mean of the accepted deltas, float32 (without noise)."""
        return self._divide(add_global=False)

    def pseudo_gradient(self) -> Weights:
        """The mean delta as it may leave the aggregate: noised when :attr:`privacy` says so."""
        if self.privacy is None or not self.privacy.adds_noise:
            return self.mean_delta()
        return self.privacy.noised(self.mean_delta(), num_participants=self.count)

    def finalize(self) -> Weights:
        """New global weights: global + weighted mean delta (plus the noise, if any)."""
        if self.privacy is None or not self.privacy.adds_noise:
            # Rounded once to float32: the sum is divided and added in float64.
            return self._divide(add_global=True)
        noisy = self.pseudo_gradient()
        return {name: (g + noisy[name]).astype(np.float32) for name, g in self.global_weights.items()}

    def finalize_source(self, source: UpdateSource) -> Weights:
        """Not for a mean: it streams whole updates through :meth:`accept`."""
        raise TypeError(f"{self.name} is mergeable: accept() the updates one by one, then finalize()")

    def _divide(self, *, add_global: bool) -> Weights:
        if self.count == 0 or self.total_weight <= 0:
            raise ValueError("no updates were accepted")
        out: Weights = {}
        for name, total in self.sums.items():
            # Block by block: the only model-sized allocation is the float32 result.
            result = np.empty(total.shape, dtype=np.float32)
            flat_total = total.reshape(-1)
            flat_result = result.reshape(-1)
            flat_global = self.global_weights[name].reshape(-1)
            for start in range(0, flat_total.size, _BLOCK):
                stop = min(start + _BLOCK, flat_total.size)
                # float64 division and addition, one rounding to float32 at the end.
                block = flat_total[start:stop] / self.total_weight
                if add_global:
                    np.add(block, flat_global[start:stop], out=block)
                if not bool(np.isfinite(block).all()):
                    raise ValueError(f"aggregated tensor {name!r} is not finite")
                flat_result[start:stop] = block
            out[name] = result
        return out

    # ---------------------------------------------------------------- persistence

    def to_state(self) -> tuple[dict[str, npt.NDArray[np.float64]], dict[str, str]]:
        """The partial sum as arrays plus string metadata (safetensors-ready)."""
        arrays = {f"{_SUM_PREFIX}{name}": total for name, total in self.sums.items()}
        metadata = {
            "kind": PARTIAL_KIND,
            "version": PARTIAL_VERSION,
            # repr of a float round-trips exactly through float().
            "total_weight": repr(self.total_weight),
            "count": str(self.count),
            "accepted_ids": json.dumps(sorted(self.accepted_ids)),
        }
        return arrays, metadata

    @classmethod
    def from_state(
        cls,
        *,
        global_weights: Mapping[str, npt.ArrayLike],
        arrays: Mapping[str, npt.ArrayLike],
        metadata: Mapping[str, str],
    ) -> WeightedMeanAggregator:
        """Rebuild a partial aggregate saved with :meth:`to_state`."""
        if metadata.get("kind") != PARTIAL_KIND or metadata.get("version") != PARTIAL_VERSION:
            raise ValueError(
                f"not a weighted-mean partial: kind={metadata.get('kind')!r} "
                f"version={metadata.get('version')!r}"
            )
        agg = cls(global_weights=global_weights)
        names = {f"{_SUM_PREFIX}{name}" for name in agg.shapes}
        if set(arrays) != names:
            raise ValueError("partial sums do not match the model's tensors")
        for name, shape in agg.shapes.items():
            saved = np.asarray(arrays[f"{_SUM_PREFIX}{name}"])
            if saved.shape != shape or saved.dtype != np.float64:
                raise ValueError(f"partial sum for {name!r} has the wrong shape or dtype")
            agg.sums[name][...] = saved
        total_weight = float(metadata["total_weight"])
        if not math.isfinite(total_weight) or total_weight < 0:
            raise ValueError("partial total weight is invalid")
        agg.total_weight = total_weight
        agg.count = int(metadata["count"])
        ids: Any = json.loads(metadata["accepted_ids"])
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise ValueError("partial accepted_ids must be a list of strings")
        agg.accepted_ids = set(ids)
        return agg


def partial_to_bytes(aggregator: WeightedMeanAggregator) -> bytes:
    """Serialise a partial sum to safetensors bytes (for storage between tasks)."""
    arrays, metadata = aggregator.to_state()
    data: bytes = st_save(dict(arrays), metadata=metadata)
    return data


def partial_from_bytes(data: bytes, *, global_weights: Mapping[str, npt.ArrayLike]) -> WeightedMeanAggregator:
    """Resume a partial sum saved with :func:`partial_to_bytes`.

    Accepting further updates continues exactly where the saved partial stopped, and
    ids already in it are skipped.
    """
    try:
        arrays = st_load(data)
    except SafetensorError as exc:
        raise ValueError(f"partial aggregate is not valid safetensors: {exc}") from None
    return WeightedMeanAggregator.from_state(
        global_weights=global_weights, arrays=arrays, metadata=_read_metadata(data)
    )


def _read_metadata(data: bytes) -> dict[str, str]:
    # safetensors.numpy.load has already validated the header; it just does not return
    # the metadata, so read it from the JSON header directly.
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}
