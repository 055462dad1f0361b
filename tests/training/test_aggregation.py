"""Aggregation strategies: exact means, merging, resumption, server optimisers, robust
rules, chunking, privacy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from scipy import stats

from training.aggregation import (
    AGGREGATORS,
    CoordinateMedianAggregator,
    FedAdam,
    FedYogi,
    InMemoryUpdateSource,
    KrumAggregator,
    SafetensorsFileSource,
    ServerOptAggregator,
    TrimmedMeanAggregator,
    UpdateFileReader,
    WeightedMeanAggregator,
    make_aggregator,
    partial_from_bytes,
    partial_to_bytes,
    state_from_bytes,
    state_to_bytes,
)
from training.aggregation.privacy import (
    add_gaussian_noise,
    clip_update,
    epsilon_for,
    noise_stddev,
)

Weights = dict[str, np.ndarray]


def model(seed: int = 0) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.normal(size=(6, 5)).astype(np.float32),
        "fc1.bias": rng.normal(size=(6,)).astype(np.float32),
        "fc2.weight": rng.normal(size=(3, 6)).astype(np.float32),
    }


def updates(n: int, seed: int = 1, scale: float = 0.1) -> list[Weights]:
    rng = np.random.default_rng(seed)
    return [
        {k: (rng.normal(size=v.shape) * scale).astype(np.float32) for k, v in model().items()}
        for _ in range(n)
    ]


def stacked(ups: list[Weights], name: str) -> np.ndarray:
    return np.stack([u[name].astype(np.float64) for u in ups])


def assert_weights_close(a: Weights, b: Weights, *, rtol: float, atol: float) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == np.float32
        np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- FedAvg


def test_fedavg_is_the_exact_weighted_mean() -> None:
    g, ups = model(), updates(5)
    weights = [10, 1, 3, 7, 2.5]
    agg = WeightedMeanAggregator(global_weights=g)
    for u, weight in zip(ups, weights, strict=True):
        assert agg.accept(u, weight=weight)
    out = agg.finalize()
    w = np.array(weights)
    expected = {
        name: (g[name] + np.tensordot(w, stacked(ups, name), axes=1) / w.sum()).astype(np.float32)
        for name in g
    }
    assert_weights_close(out, expected, rtol=0, atol=1e-7)
    assert agg.num_accepted == 5 and agg.total_weight == pytest.approx(w.sum())


def test_fedprox_is_fedavg_on_the_server() -> None:
    g, ups = model(), updates(3)
    a = make_aggregator("fedavg", global_weights=g)
    b = make_aggregator("fedprox", global_weights=g)
    for i, u in enumerate(ups):
        a.accept(u, weight=i + 1)
        b.accept(u, weight=i + 1)
    assert_weights_close(a.finalize(), b.finalize(), rtol=0, atol=0)


def test_merge_of_partials_equals_one_aggregator() -> None:
    g, ups = model(), updates(7)
    whole = WeightedMeanAggregator(global_weights=g)
    left = WeightedMeanAggregator(global_weights=g)
    right = WeightedMeanAggregator(global_weights=g)
    for i, u in enumerate(ups):
        whole.accept(u, weight=i + 1, update_id=f"u{i}")
        (left if i % 2 else right).accept(u, weight=i + 1, update_id=f"u{i}")
    left.merge(right)
    assert left.num_accepted == 7 and left.accepted_ids == whole.accepted_ids
    assert_weights_close(left.finalize(), whole.finalize(), rtol=0, atol=1e-7)


def test_merge_refuses_to_double_count() -> None:
    g, ups = model(), updates(2)
    a = WeightedMeanAggregator(global_weights=g)
    b = WeightedMeanAggregator(global_weights=g)
    a.accept(ups[0], weight=1, update_id="same")
    b.accept(ups[1], weight=1, update_id="same")
    with pytest.raises(ValueError, match="both partials"):
        a.merge(b)


def test_duplicate_accept_is_a_no_op() -> None:
    g, ups = model(), updates(2)
    agg = WeightedMeanAggregator(global_weights=g)
    assert agg.accept(ups[0], weight=2, update_id="device-1/round-3")
    assert not agg.accept(ups[1], weight=5, update_id="device-1/round-3")
    assert agg.num_accepted == 1 and agg.total_weight == 2
    assert_weights_close(agg.finalize(), {k: g[k] + ups[0][k] for k in g}, rtol=0, atol=1e-7)


def test_persisted_partial_resumes_exactly() -> None:
    g, ups = model(), updates(6)
    straight = WeightedMeanAggregator(global_weights=g)
    for i, u in enumerate(ups):
        straight.accept(u, weight=i + 0.5, update_id=f"u{i}")

    first = WeightedMeanAggregator(global_weights=g)
    for i, u in enumerate(ups[:4]):
        first.accept(u, weight=i + 0.5, update_id=f"u{i}")
    saved = partial_to_bytes(first)
    del first  # the worker crashed

    resumed = partial_from_bytes(saved, global_weights=g)
    assert resumed.num_accepted == 4
    # The retried task starts over from the first update: the saved ones are skipped.
    accepted = [resumed.accept(u, weight=i + 0.5, update_id=f"u{i}") for i, u in enumerate(ups)]
    assert accepted == [False] * 4 + [True] * 2
    out = resumed.finalize()
    reference = straight.finalize()
    for name in g:
        np.testing.assert_array_equal(out[name], reference[name])
        np.testing.assert_array_equal(resumed.sums[name], straight.sums[name])


def test_partial_from_bytes_rejects_other_models() -> None:
    agg = WeightedMeanAggregator(global_weights=model())
    agg.accept(updates(1)[0], weight=1)
    other = {"only": np.zeros(3, np.float32)}
    with pytest.raises(ValueError):
        partial_from_bytes(partial_to_bytes(agg), global_weights=other)
    with pytest.raises(ValueError):
        partial_from_bytes(b"garbage-bytes-here", global_weights=model())


def test_accept_rejects_wrong_updates() -> None:
    g = model()
    agg = WeightedMeanAggregator(global_weights=g)
    u = updates(1)[0]
    with pytest.raises(ValueError, match="missing"):
        agg.accept({k: v for k, v in u.items() if k != "fc1.bias"}, weight=1)
    with pytest.raises(ValueError, match="shape"):
        agg.accept(dict(u, **{"fc1.bias": np.zeros(7, np.float32)}), weight=1)
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="weight"):
            agg.accept(u, weight=bad)
    with pytest.raises(ValueError, match="no updates"):
        agg.finalize()
    assert agg.num_accepted == 0


def test_finalize_refuses_non_finite_result() -> None:
    g = model()
    agg = WeightedMeanAggregator(global_weights=g)
    u = updates(1)[0]
    u["fc1.bias"][0] = np.nan
    agg.accept(u, weight=1)
    with pytest.raises(ValueError, match="not finite"):
        agg.finalize()


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 12),
    split=st.integers(0, 12),
    weights=st.lists(st.floats(0.01, 1000), min_size=12, max_size=12),
)
def test_fedavg_matches_numpy_for_any_split(n: int, split: int, weights: list[float]) -> None:
    g, ups = model(), updates(n, seed=n)
    w = np.array(weights[:n])
    a = WeightedMeanAggregator(global_weights=g)
    b = WeightedMeanAggregator(global_weights=g)
    for i, u in enumerate(ups):
        (a if i < split else b).accept(u, weight=w[i])
    a.merge(b)
    out = a.finalize()
    for name in g:
        expected = g[name] + np.tensordot(w, stacked(ups, name), axes=1) / w.sum()
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- server opts


def test_fedadam_one_step_by_hand() -> None:
    g = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    deltas = [np.array([0.2, 0.0, -0.4], np.float32), np.array([0.4, 0.2, -0.2], np.float32)]
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    agg = make_aggregator("fedadam", global_weights=g, eta=eta, beta1=b1, beta2=b2, tau=tau)
    for d in deltas:
        agg.accept({"w": d}, weight=1)
    out = agg.finalize()

    delta = np.array([0.3, 0.1, -0.3])
    m = (1 - b1) * delta
    v = b2 * tau**2 + (1 - b2) * delta**2
    expected = np.array([1.0, -2.0, 0.5]) + eta * m / (np.sqrt(v) + tau)
    np.testing.assert_allclose(out["w"], expected, rtol=1e-6)
    assert isinstance(agg, ServerOptAggregator)
    np.testing.assert_allclose(agg.state.m["w"], m, rtol=1e-6)
    np.testing.assert_allclose(agg.state.v["w"], v, rtol=1e-6)
    assert agg.state.step == 1
    # It moves every coordinate in the direction the clients moved.
    assert np.all(np.sign(out["w"] - g["w"]) == np.sign(delta))


def test_fedyogi_one_step_by_hand() -> None:
    g = {"w": np.array([0.0, 1.0], np.float32)}
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-2
    opt = FedYogi(eta=eta, beta1=b1, beta2=b2, tau=tau)
    state = opt.init_state(g)
    delta = {"w": np.array([0.5, -0.001], np.float32)}
    out, new_state = opt.step(global_weights=g, pseudo_gradient=delta, state=state)

    d = np.array([0.5, -0.001], np.float64)
    v0 = np.full(2, tau**2)
    v = v0 - (1 - b2) * d**2 * np.sign(v0 - d**2)
    m = (1 - b1) * d
    np.testing.assert_allclose(out["w"], np.array([0.0, 1.0]) + eta * m / (np.sqrt(v) + tau), 1e-6)
    np.testing.assert_allclose(new_state.v["w"], v, rtol=1e-6)
    # Yogi's v moves additively: the big coordinate grows, the small one shrinks.
    assert new_state.v["w"][0] > v0[0] and new_state.v["w"][1] < v0[1]
    # The input state is left alone.
    np.testing.assert_array_equal(state.v["w"], v0.astype(np.float32))


@pytest.mark.parametrize("opt_cls", [FedAdam, FedYogi])
def test_server_optimisers_descend_a_quadratic(opt_cls: type[FedAdam]) -> None:
    # Clients pull toward the optimum at 3.0: the delta is a step toward it.
    target = np.full(4, 3.0)
    weights = {"w": np.zeros(4, np.float32)}
    opt = opt_cls(eta=0.1, tau=1e-3)
    state = opt.init_state(weights)
    start = float(np.abs(weights["w"] - target).sum())
    for _ in range(60):
        delta = {"w": (0.5 * (target - weights["w"])).astype(np.float32)}
        weights, state = opt.step(global_weights=weights, pseudo_gradient=delta, state=state)
    assert float(np.abs(weights["w"] - target).sum()) < 0.1 * start
    assert state.step == 60


def test_server_optimiser_state_persists_across_rounds() -> None:
    g, ups = model(), updates(4)
    agg = make_aggregator("fedyogi", global_weights=g, eta=0.05)
    for u in ups:
        agg.accept(u, weight=1)
    new = agg.finalize()
    assert isinstance(agg, ServerOptAggregator)
    restored = state_from_bytes(state_to_bytes(agg.state))
    assert restored.step == 1
    for name in g:
        np.testing.assert_array_equal(restored.m[name], agg.state.m[name])
        np.testing.assert_array_equal(restored.v[name], agg.state.v[name])
    nxt = make_aggregator("fedyogi", global_weights=new, eta=0.05, state=restored)
    nxt.accept(ups[0], weight=1)
    nxt.finalize()
    assert isinstance(nxt, ServerOptAggregator) and nxt.state.step == 2


def test_server_optimiser_merges_weighted_mean_partials() -> None:
    g, ups = model(), updates(4)
    direct = make_aggregator("fedadam", global_weights=g)
    for i, u in enumerate(ups):
        direct.accept(u, weight=i + 1, update_id=str(i))
    partial = WeightedMeanAggregator(global_weights=g)
    for i, u in enumerate(ups):
        partial.accept(u, weight=i + 1, update_id=str(i))
    merged = make_aggregator("fedadam", global_weights=g)
    assert isinstance(merged, ServerOptAggregator)
    merged.merge(partial_from_bytes(partial_to_bytes(partial), global_weights=g))
    assert_weights_close(merged.finalize(), direct.finalize(), rtol=0, atol=0)


# --------------------------------------------------------------------------- robust rules


def test_median_matches_numpy_and_ignores_an_outlier() -> None:
    g, ups = model(), updates(6)
    poisoned = {k: np.full_like(v, 1e6) for k, v in g.items()}
    agg = make_aggregator("median", global_weights=g)
    for u in [*ups, poisoned]:
        agg.accept(u, weight=1)
    out = agg.finalize()
    honest_max = max(float(np.abs(u[k]).max()) for u in ups for k in u)
    for name in g:
        expected = g[name] + np.median(stacked([*ups, poisoned], name), axis=0)
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-7)
        assert np.abs(out[name] - g[name]).max() <= honest_max


def test_trimmed_mean_matches_scipy_and_resists_outliers() -> None:
    g, ups = model(), updates(8)
    poisoned = {k: np.full_like(v, -1e6) for k, v in g.items()}
    allu = [*ups, poisoned, {k: -v for k, v in poisoned.items()}]
    agg = TrimmedMeanAggregator(global_weights=g, beta=0.1)
    for u in allu:
        agg.accept(u, weight=1)
    out = agg.finalize()
    for name in g:
        expected = g[name] + stats.trim_mean(stacked(allu, name), 0.1, axis=0)
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-7)
        assert np.abs(out[name] - g[name]).max() < 1.0


def test_trimmed_mean_with_zero_beta_is_the_plain_mean() -> None:
    g, ups = model(), updates(5)
    agg = make_aggregator("trimmed_mean", global_weights=g, beta=0.0)
    for u in ups:
        agg.accept(u, weight=1)
    out = agg.finalize()
    for name in g:
        np.testing.assert_allclose(out[name], g[name] + stacked(ups, name).mean(0), atol=1e-7)


def krum_reference(flat: np.ndarray, f: int, m: int) -> np.ndarray:
    n = len(flat)
    dist = ((flat[:, None, :] - flat[None, :, :]) ** 2).sum(-1)
    scores = [np.sort(np.delete(dist[i], i))[: n - f - 2].sum() for i in range(n)]
    return np.sort(np.argsort(scores, kind="stable")[:m])


def flatten(u: Weights) -> np.ndarray:
    return np.concatenate([u[k].ravel().astype(np.float64) for k in sorted(u)])


@pytest.mark.parametrize(("f", "m"), [(1, 1), (2, 3), (0, 5)])
def test_krum_matches_reference_and_never_picks_the_outlier(f: int, m: int) -> None:
    g, ups = model(), updates(8)
    poisoned = {k: np.full_like(v, 50.0) for k, v in g.items()}
    allu = [*ups[:3], poisoned, *ups[3:]]
    agg = KrumAggregator(global_weights=g, f=f, m=m, chunk=7)
    for u in allu:
        agg.accept(u, weight=1)
    out = agg.finalize()
    ref = krum_reference(np.stack([flatten(u) for u in allu]), f, m)
    np.testing.assert_array_equal(agg.selected, ref)
    assert 3 not in agg.selected.tolist()
    for name in g:
        expected = g[name] + stacked(allu, name)[ref].mean(axis=0)
        np.testing.assert_allclose(out[name], expected, rtol=1e-6, atol=1e-7)


def test_krum_needs_enough_updates() -> None:
    agg = KrumAggregator(global_weights=model(), f=2)
    for u in updates(6):
        agg.accept(u, weight=1)
    with pytest.raises(ValueError, match="at least 7"):
        agg.finalize()


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum"])
def test_order_statistics_do_not_merge(name: str) -> None:
    agg = make_aggregator(name, global_weights=model())
    other = make_aggregator(name, global_weights=model())
    assert agg.mergeable is False
    with pytest.raises(TypeError, match="not mergeable"):
        agg.merge(other)


@pytest.mark.parametrize(
    ("name", "params"),
    [("median", {}), ("trimmed_mean", {"beta": 0.2}), ("krum", {"f": 1, "m": 2})],
)
@pytest.mark.parametrize("chunk", [1, 5, 29, 10_000])
def test_chunked_equals_unchunked(name: str, params: dict[str, float], chunk: int) -> None:
    g, ups = model(), updates(7)
    whole = make_aggregator(name, global_weights=g, chunk=10**9, **params)
    chunked = make_aggregator(name, global_weights=g, chunk=chunk, **params)
    for u in ups:
        whole.accept(u, weight=1)
    expected = whole.finalize()
    got = chunked.finalize_source(InMemoryUpdateSource(ups))
    assert_weights_close(got, expected, rtol=0, atol=1e-6)


def test_file_source_reads_slices_from_safetensors(tmp_path: Path) -> None:
    g, ups = model(), updates(5)
    paths = []
    for i, u in enumerate(ups):
        path = tmp_path / f"update-{i}.safetensors"
        save_file(u, str(path))
        paths.append(path)
    source = SafetensorsFileSource(paths)
    assert source.num_updates == 5
    block = source.read("fc1.weight", 4, 11)
    np.testing.assert_array_equal(block, stacked(ups, "fc1.weight").reshape(5, -1)[:, 4:11])
    agg = CoordinateMedianAggregator(global_weights=g, chunk=4)
    out = agg.finalize_source(source)
    for name in g:
        np.testing.assert_allclose(out[name], g[name] + np.median(stacked(ups, name), 0), 1e-6)


def test_update_file_reader_streams_files_into_fedavg(tmp_path: Path) -> None:
    g, ups = model(), updates(4)
    reader = UpdateFileReader()
    streamed = WeightedMeanAggregator(global_weights=g)
    direct = WeightedMeanAggregator(global_weights=g)
    for i, u in enumerate(ups):
        path = tmp_path / f"u{i}.safetensors"
        save_file(u, str(path))
        read = reader.read(path)
        for name in g:
            np.testing.assert_array_equal(read[name], u[name])
            assert not read[name].flags.writeable
        streamed.accept(read, weight=i + 1, update_id=str(i))
        direct.accept(u, weight=i + 1, update_id=str(i))
        del read
    assert_weights_close(streamed.finalize(), direct.finalize(), rtol=0, atol=0)
    # A file with another layout after the cached one is parsed afresh.
    other = tmp_path / "other.safetensors"
    save_file({"x": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(other))
    read = reader.read(other)
    assert list(read) == ["x"]
    np.testing.assert_array_equal(read["x"], np.arange(6).reshape(2, 3))


def test_update_file_reader_rejects_bad_files(tmp_path: Path) -> None:
    reader = UpdateFileReader()
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="not a safetensors"):
        reader.read(empty)
    f64 = tmp_path / "f64.safetensors"
    save_file({"w": np.zeros(3)}, str(f64))
    with pytest.raises(ValueError, match="not F32"):
        reader.read(f64)
    whole = tmp_path / "whole.safetensors"
    save_file({"w": np.zeros(30, np.float32)}, str(whole))
    reader.read(whole)
    # Same header as the cached one, but the data is cut short.
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(whole.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        reader.read(cut)


# --------------------------------------------------------------------------- registry


def test_registry_knows_every_name_and_rejects_others() -> None:
    g = model()
    for name in AGGREGATORS:
        agg = make_aggregator(name, global_weights=g)
        assert agg.name == name
    with pytest.raises(ValueError, match="unknown aggregator"):
        make_aggregator("fedsgd-magic", global_weights=g)
    with pytest.raises(ValueError, match="bad parameters"):
        make_aggregator("krum", global_weights=g, gamma=3)
    with pytest.raises(ValueError, match="bad parameters"):
        make_aggregator("fedavg", global_weights=g, eta=1.0)


# --------------------------------------------------------------------------- privacy


def test_gaussian_noise_has_the_right_scale_and_is_seeded() -> None:
    mean = {"w": np.zeros(200_000, np.float32)}
    kwargs = {"clip_norm": 2.0, "noise_multiplier": 1.5, "num_participants": 10}
    noisy = add_gaussian_noise(mean, rng=np.random.default_rng(7), **kwargs)  # type: ignore[arg-type]
    again = add_gaussian_noise(mean, rng=np.random.default_rng(7), **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(noisy["w"], again["w"])
    sigma = noise_stddev(**kwargs)  # type: ignore[arg-type]
    assert sigma == pytest.approx(0.3)
    assert float(noisy["w"].std()) == pytest.approx(sigma, rel=0.01)
    assert abs(float(noisy["w"].mean())) < 0.01


def test_clip_update_bounds_the_norm() -> None:
    update = {"a": np.full(4, 3.0, np.float32), "b": np.full(9, 4.0, np.float32)}
    clipped, scale = clip_update(update, max_norm=1.0)
    norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in clipped.values()))
    assert norm == pytest.approx(1.0, rel=1e-6) and scale < 1


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    eps = [epsilon_for(noise_multiplier=1.1, sample_rate=0.01, steps=s, delta=1e-5) for s in (10, 100, 1000)]
    assert eps[0] < eps[1] < eps[2]
    noisier = [
        epsilon_for(noise_multiplier=z, sample_rate=0.01, steps=1000, delta=1e-5) for z in (0.8, 1.1, 2.0)
    ]
    assert noisier[0] > noisier[1] > noisier[2]
    # Known reference point of this accountant (Abadi et al. style MNIST setting).
    assert 1.0 < eps[2] < 3.0
    assert epsilon_for(noise_multiplier=0.0, sample_rate=0.1, steps=1, delta=1e-5) == math.inf


def test_secure_noise_has_the_configured_scale_and_no_job_field_reproduces_it() -> None:
    """The noise's scale measured against the multiplier; another key, other noise."""
    from scipy import stats

    from training.aggregation.privacy import SecureNormal

    mean = {"w": np.zeros(400_000, np.float32), "b": np.zeros(7, np.float32)}
    kwargs = {"clip_norm": 2.0, "noise_multiplier": 1.5, "num_participants": 10}
    key = bytes(range(32))
    noisy = add_gaussian_noise(mean, rng=SecureNormal(key), **kwargs)  # type: ignore[arg-type]
    again = add_gaussian_noise(dict(reversed(mean.items())), rng=SecureNormal(key), **kwargs)  # type: ignore[arg-type]
    np.testing.assert_array_equal(noisy["w"], again["w"])  # same key, same noise, any order
    sigma = noise_stddev(**kwargs)  # type: ignore[arg-type]
    w = noisy["w"].astype(np.float64)
    assert float(w.std()) == pytest.approx(sigma, rel=0.01)
    assert abs(float(w.mean())) < 3 * sigma / np.sqrt(len(w))
    # Gaussian, not merely the right spread: a Kolmogorov-Smirnov test on the draws.
    assert stats.kstest(w[:20_000] / sigma, "norm").pvalue > 1e-3
    other = add_gaussian_noise(mean, rng=SecureNormal(bytes(32)), **kwargs)  # type: ignore[arg-type]
    assert abs(float(np.corrcoef(w, other["w"])[0, 1])) < 0.01
