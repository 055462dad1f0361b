"""The Aggregator interface: what a round's orchestration relies on, for every strategy
by name (mergeable or not, checkpoints, server state, the privacy transform)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from training.aggregation import (
    AGGREGATORS,
    FedAdam,
    InMemoryUpdateSource,
    Privacy,
    make_aggregator,
)
from training.aggregation.privacy import SecureNormal, add_gaussian_noise, clip_update

Weights = dict[str, np.ndarray]
MEAN_FAMILY = ("fedavg", "fedprox", "fedadam", "fedyogi")
ORDER_STATISTICS = ("median", "trimmed_mean", "krum")
PARAMS: dict[str, dict[str, Any]] = {"krum": {"f": 1}}


def model() -> Weights:
    rng = np.random.default_rng(0)
    return {"a": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=(5,)).astype(np.float32)}


def updates(n: int, scale: float = 0.5) -> list[Weights]:
    rng = np.random.default_rng(1)
    return [
        {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in model().items()}
        for _ in range(n)
    ]


def test_the_registry_covers_both_families() -> None:
    assert set(AGGREGATORS) == {*MEAN_FAMILY, *ORDER_STATISTICS}
    for name in AGGREGATORS:
        agg = make_aggregator(name, global_weights=model(), **PARAMS.get(name, {}))
        assert agg.mergeable is (name in MEAN_FAMILY)


@pytest.mark.parametrize("name", MEAN_FAMILY)
def test_mergeable_rules_resume_from_a_checkpoint_exactly(name: str) -> None:
    ups = updates(6)
    straight = make_aggregator(name, global_weights=model())
    for i, u in enumerate(ups):
        straight.accept(u, weight=i + 1, update_id=str(i))
    first = make_aggregator(name, global_weights=model())
    for i, u in enumerate(ups[:4]):
        first.accept(u, weight=i + 1, update_id=str(i))
    resumed = make_aggregator(name, global_weights=model())
    resumed.resume(first.checkpoint())
    assert resumed.accepted_ids == {"0", "1", "2", "3"}
    for i, u in enumerate(ups):
        resumed.accept(u, weight=i + 1, update_id=str(i))  # the first four are skipped
    assert resumed.num_accepted == 6
    expected, got = straight.finalize(), resumed.finalize()
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])
    with pytest.raises(TypeError, match="mergeable"):
        straight.finalize_source(InMemoryUpdateSource(ups))


@pytest.mark.parametrize("name", ORDER_STATISTICS)
def test_order_statistics_have_no_checkpoint_and_read_sources(name: str) -> None:
    agg = make_aggregator(name, global_weights=model(), **PARAMS.get(name, {}))
    with pytest.raises(TypeError, match="not mergeable"):
        agg.checkpoint()
    with pytest.raises(TypeError, match="not mergeable"):
        agg.resume(b"")
    out = agg.finalize_source(InMemoryUpdateSource(updates(5)))
    assert set(out) == set(model())


@pytest.mark.parametrize("name", AGGREGATORS)
def test_server_state_goes_through_the_interface(name: str) -> None:
    ups = updates(5)
    agg = make_aggregator(name, global_weights=model(), **PARAMS.get(name, {}))
    for u in ups:
        agg.accept(u, weight=1)
    new = agg.finalize()
    state = agg.state_bytes()
    if name not in ("fedadam", "fedyogi"):
        assert state is None
        with pytest.raises(ValueError, match="no server state"):
            agg.load_state(b"")
        return
    assert isinstance(state, bytes)
    # The next round continues from it: the same as one optimiser carrying its state.
    nxt = make_aggregator(name, global_weights=new)
    nxt.load_state(state)
    for u in ups:
        nxt.accept(u, weight=1)
    second = nxt.finalize()
    carried = make_aggregator(name, global_weights=new, state=getattr(agg, "state"))  # noqa: B009
    for u in ups:
        carried.accept(u, weight=1)
    for k, v in carried.finalize().items():
        np.testing.assert_array_equal(second[k], v)
    with pytest.raises(ValueError):
        make_aggregator(name, global_weights={"other": np.zeros(2, np.float32)}).load_state(state)


def test_fedavg_under_privacy_clips_weighs_equally_and_adds_seeded_noise() -> None:
    g, ups = model(), updates(4, scale=2.0)
    key = bytes(range(32))
    privacy = Privacy(clip_norm=1.0, noise_multiplier=0.8, key=key)
    agg = make_aggregator("fedavg", global_weights=g, privacy=privacy)
    for i, u in enumerate(ups):
        agg.accept(u, weight=10 * (i + 1))  # example counts are ignored under noise
    clipped = [clip_update(u, max_norm=1.0)[0] for u in ups]
    mean = {k: np.mean([c[k].astype(np.float64) for c in clipped], axis=0).astype(np.float32) for k in g}
    noisy = add_gaussian_noise(
        mean, clip_norm=1.0, noise_multiplier=0.8, num_participants=4, rng=SecureNormal(key)
    )
    out = agg.finalize()
    for k in g:
        np.testing.assert_allclose(out[k], g[k] + noisy[k], rtol=0, atol=1e-6)
    again = make_aggregator("fedavg", global_weights=g, privacy=privacy)
    for u in ups:
        again.accept(u, weight=1)
    for k in g:  # the same key draws the same noise (a retried round)
        np.testing.assert_array_equal(again.finalize()[k], out[k])
    other = make_aggregator(
        "fedavg", global_weights=g, privacy=Privacy(clip_norm=1.0, noise_multiplier=0.8, key=bytes(32))
    )
    for u in ups:
        other.accept(u, weight=1)
    assert not np.array_equal(other.finalize()["a"], out["a"])


def test_clipping_without_noise_keeps_example_weights() -> None:
    g, ups = model(), updates(3, scale=2.0)
    agg = make_aggregator("fedprox", global_weights=g, privacy=Privacy(clip_norm=1.0))
    for i, u in enumerate(ups):
        agg.accept(u, weight=i + 1)
    clipped = [clip_update(u, max_norm=1.0)[0] for u in ups]
    out = agg.finalize()
    for k in g:
        expected = g[k] + sum((i + 1) * c[k].astype(np.float64) for i, c in enumerate(clipped)) / 6
        np.testing.assert_allclose(out[k], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimisers_step_on_the_noised_mean(name: str) -> None:
    g, ups = model(), updates(3)
    privacy = Privacy(clip_norm=1.0, noise_multiplier=1.0, key=b"k" * 32)
    agg = make_aggregator(name, global_weights=g, privacy=privacy, eta=0.05)
    for u in ups:
        agg.accept(u, weight=5)
    reference = make_aggregator("fedavg", global_weights=g, privacy=privacy)
    for u in ups:
        reference.accept(u, weight=5)
    noisy = {k: v - g[k] for k, v in reference.finalize().items()}
    optimizer: FedAdam = getattr(agg, "optimizer")  # noqa: B009
    expected, _ = optimizer.step(global_weights=g, pseudo_gradient=noisy, state=optimizer.init_state(g))
    for k, v in agg.finalize().items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ORDER_STATISTICS)
def test_order_statistics_refuse_noise_but_take_a_clip_norm(name: str) -> None:
    with pytest.raises(ValueError, match="cannot add differential-privacy noise"):
        make_aggregator(name, global_weights=model(), privacy=Privacy(clip_norm=1.0, noise_multiplier=0.5))
    make_aggregator(name, global_weights=model(), privacy=Privacy(clip_norm=1.0), **PARAMS.get(name, {}))


def test_privacy_checks_its_numbers() -> None:
    with pytest.raises(ValueError):
        Privacy(clip_norm=0.0)
    with pytest.raises(ValueError):
        Privacy(clip_norm=1.0, noise_multiplier=-1.0)
    with pytest.raises(ValueError, match="privacy must be a Privacy"):
        make_aggregator("fedavg", global_weights=model(), privacy={"clip_norm": 1.0})


@pytest.mark.parametrize(
    ("name", "params"), [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1})]
)
def test_robust_strategies_hold_against_a_poisoned_update_with_a_huge_weight(
    name: str, params: dict[str, Any]
) -> None:
    """Nine honest boards and one that sends a wild delta claiming two billion examples."""
    g = model()
    rng = np.random.default_rng(5)
    honest = [
        {k: (0.01 + 0.001 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in g.items()}
        for _ in range(9)
    ]
    poisoned = {k: np.full(v.shape, 100.0, np.float32) for k, v in g.items()}
    agg = make_aggregator(name, global_weights=g, **params)
    for i, u in enumerate(honest):
        agg.accept(u, weight=40, update_id=f"h{i}")
    agg.accept(poisoned, weight=2_000_000_000, update_id="poisoned")
    out = agg.finalize()
    for k in g:
        moved = out[k].astype(np.float64) - g[k]
        assert np.all(np.abs(moved - 0.01) < 0.01), (name, k, float(np.abs(moved).max()))
