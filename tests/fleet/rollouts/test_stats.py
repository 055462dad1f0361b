"""The experiment statistics, checked against known answers and by simulation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from fleet.rollouts.simulation import SimulatedFleet, simulate_experiments
from fleet.rollouts.stats import msprt, two_proportion_ztest, welch_ttest


def test_two_proportion_ztest_known_values() -> None:
    result = two_proportion_ztest(successes_a=80, n_a=100, successes_b=90, n_b=100)
    # Pooled p = 0.85, se = sqrt(0.85 * 0.15 * 0.02) = 0.050498; z = 0.1 / se.
    assert result.statistic == pytest.approx(0.1 / 0.0504975, rel=1e-4)
    assert result.p_value == pytest.approx(2 * sps.norm.sf(1.98029), rel=1e-3)
    assert result.ci_low < 0.1 < result.ci_high
    assert result.diff == pytest.approx(0.1)


def test_welch_matches_scipy() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(10, 2, 40), rng.normal(11, 4, 60)
    ours = welch_ttest(a=a, b=b)
    ref = sps.ttest_ind(b, a, equal_var=False)
    assert ours.statistic == pytest.approx(ref.statistic)
    assert ours.p_value == pytest.approx(ref.pvalue)
    assert ours.ci_low < ours.diff < ours.ci_high


def _aa_false_positive_rates(*, sims: int, looks: list[int], p: float, seed: int) -> tuple[float, float]:
    """Share of A/A experiments that a peeking z-test and the mSPRT ever call significant."""
    rng = np.random.default_rng(seed)
    n_max = looks[-1]
    z_hits = m_hits = 0
    for _ in range(sims):
        a = np.cumsum(rng.random(n_max) < p)
        b = np.cumsum(rng.random(n_max) < p)
        z_fired = m_fired = False
        for n in looks:
            sa, sb = int(a[n - 1]), int(b[n - 1])
            z_fired |= two_proportion_ztest(successes_a=sa, n_a=n, successes_b=sb, n_b=n).significant
            pa, pb = sa / n, sb / n
            m_fired |= msprt(
                mean_a=pa, var_a=pa * (1 - pa), n_a=n, mean_b=pb, var_b=pb * (1 - pb), n_b=n, tau=0.05
            ).significant
        z_hits += z_fired
        m_hits += m_fired
    return z_hits / sims, m_hits / sims


def test_msprt_keeps_false_positives_near_alpha_under_repeated_looks() -> None:
    looks = list(range(100, 3001, 100))  # 30 looks per experiment
    z_rate, m_rate = _aa_false_positive_rates(sims=200, looks=looks, p=0.8, seed=20261123)
    # With 30 looks, a fixed-horizon z-test at 5% fires in far more than 5% of A/A runs...
    assert z_rate > 0.12
    # ...while the always-valid test stays at or under alpha (binomial sd at 200 runs is 0.015).
    assert m_rate <= 0.08


def test_msprt_finds_a_real_difference_and_its_interval_covers_it() -> None:
    rng = np.random.default_rng(5)
    n = 2000
    a = (rng.random(n) < 0.80).astype(float)
    b = (rng.random(n) < 0.88).astype(float)
    pa, pb = a.mean(), b.mean()
    result = msprt(mean_a=pa, var_a=pa * (1 - pa), n_a=n, mean_b=pb, var_b=pb * (1 - pb), n_b=n, tau=0.05)
    assert result.significant
    assert result.ci_low < 0.08 < result.ci_high
    assert result.ci_low > 0
    # The always-valid interval is wider than the fixed-horizon one at the same n.
    fixed = two_proportion_ztest(successes_a=int(a.sum()), n_a=n, successes_b=int(b.sum()), n_b=n)
    assert (result.ci_high - result.ci_low) > (fixed.ci_high - fixed.ci_low)


# --- per-device analysis on a heterogeneous fleet -----------------------------------------


@pytest.mark.parametrize(
    "fleet",
    [
        SimulatedFleet(),
        SimulatedFleet(devices=20, min_devices_per_arm=3, device_sd=0.12),
        SimulatedFleet(devices=80, rate_sigma=2.0, samples_per_look=30),
    ],
    ids=["40 devices", "20 devices, wide spread", "80 devices, very unequal rates"],
)
def test_aa_false_positives_stay_at_alpha_when_devices_are_the_unit(fleet: SimulatedFleet) -> None:
    """200 A/A experiments x 30 looks: devices differ, report unequally, are looked at often."""
    result = simulate_experiments(fleet, seed=20261202)
    # Treating each inference as independent calls most A/A experiments significant:
    # a device's lasting quirks look like evidence, and more samples make it surer.
    assert result.per_sample_msprt > 0.3 and result.per_sample_fixed_last_look > 0.3
    # Each device one vote keeps the always-valid test at its nominal level over all the
    # looks (alpha 0.05; the binomial sd at 200 experiments is 0.015).
    assert result.per_device_msprt <= fleet.alpha + 0.02
    # Peeking at a fixed-horizon test still inflates it, even per device.
    assert result.per_device_fixed_every_look > result.per_device_msprt


def test_per_device_analysis_still_finds_a_real_difference() -> None:
    # 8 accuracy points on every device, 100 devices that differ by 8 points among themselves.
    result = simulate_experiments(SimulatedFleet(effect=0.08, devices=100, experiments=100), seed=3)
    assert result.per_device_msprt > 0.9
