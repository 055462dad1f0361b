"""The merge contract for aggregators in a hierarchy: shards on gateways, regional
aggregators, one global aggregator. Partial sums travel upward as checkpoint bytes;
two levels (shards -> regions -> global) give the flat aggregation.

Where privacy applies (see ``training.aggregation.privacy``): every update is clipped
where it is accepted (the leaf that reads it), with equal weights when noise is asked
for; partial sums carry no noise; the noise is drawn once, by whoever finalizes (the
global aggregator), calibrated to the total number of participants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from training.aggregation import (
    AGGREGATORS,
    Privacy,
    WeightedMeanAggregator,
    make_aggregator,
    partial_from_bytes,
)

SHAPES = {"fc.weight": (16, 8), "fc.bias": (8,), "out.weight": (8, 3)}
KEY = bytes(range(32))


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _updates(n: int, seed: int = 1) -> list[tuple[str, dict[str, np.ndarray], float]]:
    rng = np.random.default_rng(seed)
    return [
        (
            f"dev-{i}",
            {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in SHAPES.items()},
            float(rng.integers(5, 200)),
        )
        for i in range(n)
    ]


def _make(strategy: str, privacy: Privacy | None, global_weights: dict[str, np.ndarray]) -> Any:
    params: dict[str, Any] = {"eta": 0.05} if strategy in ("fedadam", "fedyogi") else {}
    return make_aggregator(strategy, global_weights=global_weights, privacy=privacy, **params)


def _flat(strategy: str, privacy: Privacy | None, g: dict[str, np.ndarray], ups: list[Any]) -> Any:
    agg = _make(strategy, privacy, g)
    for uid, update, weight in ups:
        agg.accept(update, weight=weight, update_id=uid)
    return agg


def _leaf_privacy(privacy: Privacy | None) -> Privacy | None:
    """What a shard or gateway holds: the clipping and the noise setting, never the key."""
    if privacy is None:
        return None
    return Privacy(clip_norm=privacy.clip_norm, noise_multiplier=privacy.noise_multiplier)


def _two_levels(
    strategy: str, privacy: Privacy | None, g: dict[str, np.ndarray], ups: list[Any], regions: list[list[int]]
) -> Any:
    """shards (3 updates each) -> one regional aggregator per region -> global."""
    upward: list[bytes] = []
    for members in regions:
        region = WeightedMeanAggregator(global_weights=g)
        for start in range(0, len(members), 3):
            shard = _make(strategy, _leaf_privacy(privacy), g)
            for index in members[start : start + 3]:
                uid, update, weight = ups[index]
                shard.accept(update, weight=weight, update_id=uid)
            # A gateway sends its partial sum upward as bytes; the region merges it.
            region.merge(partial_from_bytes(shard.checkpoint(), global_weights=g))
        upward.append(region.checkpoint())
    top = _make(strategy, privacy, g)
    for data in upward:
        top.merge(partial_from_bytes(data, global_weights=g))
    return top


def _max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in b)


CASES = [
    ("fedavg", None),
    ("fedprox", None),
    ("fedadam", None),
    ("fedyogi", None),
    ("fedavg", Privacy(clip_norm=1.0)),
    ("fedavg", Privacy(clip_norm=1.0, noise_multiplier=1.1, key=KEY)),
    ("fedadam", Privacy(clip_norm=1.0, noise_multiplier=1.1, key=KEY)),
    ("fedyogi", Privacy(clip_norm=1.0, noise_multiplier=0.5, key=KEY)),
]


@pytest.mark.parametrize(("strategy", "privacy"), CASES)
def test_shards_to_regions_to_global_equals_flat(strategy: str, privacy: Privacy | None) -> None:
    g, ups = _model(), _updates(23)
    regions = [list(range(0, 10)), list(range(10, 17)), list(range(17, 23))]
    flat = _flat(strategy, privacy, g, ups)
    top = _two_levels(strategy, privacy, g, ups, regions)
    assert top.num_accepted == flat.num_accepted == 23
    assert top.accepted_ids == flat.accepted_ids
    assert _max_abs_diff(top.finalize(), flat.finalize()) <= 1e-6
    if strategy in ("fedadam", "fedyogi"):
        # The server optimiser steps once, at the top, on the same pseudo-gradient.
        assert _max_abs_diff(top.state.m, flat.state.m) <= 1e-6
        assert _max_abs_diff(top.state.v, flat.state.v) <= 1e-6


def test_the_order_of_regions_does_not_change_the_result() -> None:
    g, ups = _model(), _updates(12)
    privacy = Privacy(clip_norm=1.0, noise_multiplier=1.0, key=KEY)
    forward = _two_levels("fedavg", privacy, g, ups, [list(range(6)), list(range(6, 12))])
    backward = _two_levels("fedavg", privacy, g, ups, [list(range(6, 12)), list(range(6))])
    assert _max_abs_diff(forward.finalize(), backward.finalize()) <= 1e-6


def test_clipping_is_applied_once_where_the_update_is_read() -> None:
    """A region merging clipped partial sums does not clip again (merging is addition)."""
    g = _model()
    big = {k: np.full(s, 10.0, np.float32) for k, s in SHAPES.items()}
    clip = Privacy(clip_norm=1.0)
    leaf = WeightedMeanAggregator(global_weights=g, privacy=clip)
    leaf.accept(big, weight=1.0, update_id="a")
    leaf.accept(big, weight=1.0, update_id="b")
    region = WeightedMeanAggregator(global_weights=g, privacy=clip)
    region.merge(partial_from_bytes(leaf.checkpoint(), global_weights=g))
    norm = np.sqrt(sum(float((t.astype(np.float64) ** 2).sum()) for t in region.sums.values()))
    assert norm == pytest.approx(2.0, rel=1e-6)  # two clipped updates, not one re-clipped sum
    delta = region.mean_delta()
    assert np.sqrt(sum(float((t.astype(np.float64) ** 2).sum()) for t in delta.values())) == pytest.approx(
        1.0
    )


def test_partial_sums_carry_no_noise_the_top_draws_it_once() -> None:
    g, ups = _model(), _updates(8)
    noisy = Privacy(clip_norm=1.0, noise_multiplier=2.0, key=KEY)
    clipped_only = Privacy(clip_norm=1.0)
    with_noise = _flat("fedavg", _leaf_privacy(noisy), g, ups)
    # Equal weights under noise (the sensitivity bound needs it), and nothing else: the
    # sums are those of the clipped updates, with no noise in them.
    clipped_equal = _flat("fedavg", clipped_only, g, [(uid, u, 1.0) for uid, u, _ in ups])
    assert with_noise.total_weight == 8.0
    for name in SHAPES:
        np.testing.assert_array_equal(with_noise.sums[name], clipped_equal.sums[name])
    exact = partial_from_bytes(with_noise.checkpoint(), global_weights=g)
    for name in SHAPES:
        np.testing.assert_array_equal(exact.sums[name], with_noise.sums[name])
    top = WeightedMeanAggregator(global_weights=g, privacy=noisy)
    top.merge(exact)
    # sigma = z * C / n with n the participants of the whole round, known only at the top.
    noise = {k: top.finalize()[k].astype(np.float64) - (g[k] + top.mean_delta()[k]) for k in SHAPES}
    spread = np.concatenate([v.ravel() for v in noise.values()]).std()
    assert spread == pytest.approx(2.0 * 1.0 / 8, rel=0.2)


def test_a_partial_sent_twice_is_refused() -> None:
    g, ups = _model(), _updates(6)
    shard = _flat("fedavg", None, g, ups[:3])
    top = WeightedMeanAggregator(global_weights=g)
    top.merge(partial_from_bytes(shard.checkpoint(), global_weights=g))
    with pytest.raises(ValueError, match="counted in both"):
        top.merge(partial_from_bytes(shard.checkpoint(), global_weights=g))


@pytest.mark.parametrize("strategy", AGGREGATORS)
def test_which_rules_merge(strategy: str) -> None:
    g = _model()
    agg = _make(strategy, None, g)
    other = _make(strategy, None, g)
    if strategy in ("fedavg", "fedprox", "fedadam", "fedyogi"):
        assert agg.mergeable
        agg.merge(other)
    else:
        # Order statistics need every update at once: they stay on one worker.
        assert not agg.mergeable
        with pytest.raises(TypeError, match="not mergeable"):
            agg.merge(other)
        with pytest.raises(TypeError):
            agg.checkpoint()
