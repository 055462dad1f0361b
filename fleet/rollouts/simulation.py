"""Simulations of the experiment statistics on a synthetic heterogeneous fleet.

With `effect` 0 (an A/A experiment) both arms run equally good versions, so every
"significant" difference is a false positive; with an effect, the rates are the power.
The fleet is what real fleets look like: each device has its own accuracy (boards see
different inputs: `device_sd` spreads them around `accuracy`), devices report at very
different rates (log-normal, `rate_sigma`), and the experiment is evaluated at every
look as it accumulates samples. Two analyses are compared on the same data:

- **per sample**: every inference an independent observation, the arms' pooled counts in
  the mSPRT (what experiments ran before) and the two-proportion z-test;
- **per device**: each device one observation, its own mean, with the rules
  `fleet.services.experiments` applies (a device counts once it has
  `min_samples_per_device` samples, a look once both arms have `min_devices_per_arm`
  devices): the mSPRT and Welch's t on the per-device means
  (`fleet.rollouts.stats.look_at_device_means`).

For each, the share of experiments ever called significant by the always-valid test,
by a fixed-horizon test checked at every look, and by the fixed test at the last look
only. Pure numpy on synthetic data: seeded, and 200 experiments of 30 looks take about a
second, for a test and `python -m benchmarks.ab_validity`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fleet.rollouts.stats import look_at_device_means, msprt, two_proportion_ztest


@dataclass(frozen=True)
class SimulatedFleet:
    """The synthetic fleet and the experiment's settings."""

    effect: float = 0.0  # the treatment's accuracy minus the control's, on every device
    experiments: int = 200
    looks: int = 30
    devices: int = 40
    accuracy: float = 0.85
    device_sd: float = 0.08  # spread of the devices' own accuracies
    samples_per_look: float = 15.0  # a device's mean number of new samples between looks
    rate_sigma: float = 1.0  # log-normal spread of the devices' reporting rates
    min_samples_per_device: int = 20
    min_devices_per_arm: int = 5
    min_samples_per_arm: int = 200
    alpha: float = 0.05
    effect_scale: float = 0.05


@dataclass(frozen=True)
class SimulationResult:
    """Shares of the experiments ever called significant (false positives in an A/A run)."""

    per_sample_msprt: float
    per_device_msprt: float
    per_sample_fixed_every_look: float
    per_device_fixed_every_look: float
    per_sample_fixed_last_look: float
    per_device_fixed_last_look: float
    experiments: int
    alpha: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def simulate_experiments(fleet: SimulatedFleet, *, seed: int = 0) -> SimulationResult:
    """Run ``fleet.experiments`` experiments of ``fleet.looks`` looks each."""
    rng = np.random.default_rng(seed)
    hits = {
        key: 0
        for key in (
            "sample_msprt",
            "device_msprt",
            "sample_fixed_any",
            "device_fixed_any",
            "sample_fixed_last",
            "device_fixed_last",
        )
    }
    n_dev = fleet.devices
    for _ in range(fleet.experiments):
        # Devices are assigned to arms at random (the service hashes their ids).
        treated = rng.random(n_dev) < 0.5
        own = fleet.accuracy + rng.normal(0.0, fleet.device_sd, n_dev)
        accuracy = np.clip(own + np.where(treated, fleet.effect, 0.0), 0.01, 0.99)
        spread = rng.lognormal(0.0, fleet.rate_sigma, n_dev) / np.exp(fleet.rate_sigma**2 / 2)
        rate = fleet.samples_per_look * spread
        correct = np.zeros(n_dev)
        seen = np.zeros(n_dev)
        sample_p = device_p = 1.0
        fired = dict.fromkeys(hits, False)
        for look in range(fleet.looks):
            new = rng.poisson(rate)
            correct += rng.binomial(new, accuracy)
            seen += new
            last = look == fleet.looks - 1
            sample_p = _look_per_sample(fleet, correct, seen, treated, sample_p, fired, last=last)
            device_p = _look_per_device(fleet, correct, seen, treated, device_p, fired, last=last)
        for key in hits:
            hits[key] += fired[key]
    rate_of = {key: value / fleet.experiments for key, value in hits.items()}
    return SimulationResult(
        per_sample_msprt=rate_of["sample_msprt"],
        per_device_msprt=rate_of["device_msprt"],
        per_sample_fixed_every_look=rate_of["sample_fixed_any"],
        per_device_fixed_every_look=rate_of["device_fixed_any"],
        per_sample_fixed_last_look=rate_of["sample_fixed_last"],
        per_device_fixed_last_look=rate_of["device_fixed_last"],
        experiments=fleet.experiments,
        alpha=fleet.alpha,
    )


def _look_per_sample(
    fleet: SimulatedFleet,
    correct: np.ndarray,
    seen: np.ndarray,
    treated: np.ndarray,
    running_p: float,
    fired: dict[str, bool],
    *,
    last: bool,
) -> float:
    n_a, n_b = int(seen[~treated].sum()), int(seen[treated].sum())
    if n_a < 2 or n_b < 2:
        return running_p
    s_a, s_b = int(correct[~treated].sum()), int(correct[treated].sum())
    p_a, p_b = s_a / n_a, s_b / n_b
    look = msprt(
        mean_a=p_a,
        var_a=p_a * (1 - p_a) * n_a / (n_a - 1),
        n_a=n_a,
        mean_b=p_b,
        var_b=p_b * (1 - p_b) * n_b / (n_b - 1),
        n_b=n_b,
        tau=fleet.effect_scale,
        alpha=fleet.alpha,
    )
    running_p = min(running_p, look.p_value)
    if running_p < fleet.alpha and min(n_a, n_b) >= fleet.min_samples_per_arm:
        fired["sample_msprt"] = True
    z = two_proportion_ztest(successes_a=s_a, n_a=n_a, successes_b=s_b, n_b=n_b, alpha=fleet.alpha)
    fired["sample_fixed_any"] |= z.significant
    fired["sample_fixed_last"] |= last and z.significant
    return running_p


def _look_per_device(
    fleet: SimulatedFleet,
    correct: np.ndarray,
    seen: np.ndarray,
    treated: np.ndarray,
    running_p: float,
    fired: dict[str, bool],
    *,
    last: bool,
) -> float:
    counted = seen >= fleet.min_samples_per_device
    control, treatment = counted & ~treated, counted & treated
    minimum = max(2, fleet.min_devices_per_arm)
    if control.sum() < minimum or treatment.sum() < minimum:
        return running_p
    look = look_at_device_means(
        control=correct[control] / seen[control],
        treatment=correct[treatment] / seen[treatment],
        tau=fleet.effect_scale,
        alpha=fleet.alpha,
        previous_p=running_p,
    )
    enough = min(seen[control].sum(), seen[treatment].sum()) >= fleet.min_samples_per_arm
    if look.significant and enough:
        fired["device_msprt"] = True
    fired["device_fixed_any"] |= look.fixed.significant
    fired["device_fixed_last"] |= last and look.fixed.significant
    return look.always_valid_p
