"""Statistics for A/B experiments: fixed-horizon tests and an always-valid sequential test.

Differences are always arm B minus arm A (treatment minus control).

- `two_proportion_ztest`: accuracy (mean of 0/1 `correct`), pooled-variance z statistic,
  Wald interval on the difference with unpooled variance.
- `welch_ttest`: latency, unequal variances, Welch-Satterthwaite degrees of freedom.
- `msprt`: the mixture sequential probability ratio test (Robbins; Johari, Pekelis and
  Walsh, "Always valid inference", 2017) for a difference of means with a normal mixing
  distribution N(0, tau^2) and plug-in variances. Its statistic is an e-value: under the
  null the chance it ever exceeds 1/alpha, however often one looks, is at most alpha. So
  an experiment can be evaluated every few seconds and stopped at the first look where
  the always-valid p-value (the running minimum of 1/Lambda) drops below alpha, and the
  confidence sequence (the set of differences the test would not reject) is valid at
  every look at once. The fixed-horizon tests are not: peeking at them repeatedly
  inflates false positives (see the tests).
- `look_at_device_means`: what experiments run, the mSPRT and Welch's t on per-device
  means (the device is the unit that is randomised; `fleet.rollouts.simulation` measures
  the false-positive rate of this and of a per-sample analysis on a heterogeneous fleet).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import special


@dataclass(frozen=True)
class Comparison:
    """A comparison of arm B with arm A: difference, interval, p-value and how sure."""

    method: str
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    statistic: float
    alpha: float

    @property
    def significant(self) -> bool:
        return self.p_value < self.alpha

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["significant"] = self.significant
        data["confidence"] = 1.0 - self.alpha
        return data


def two_proportion_ztest(
    *, successes_a: int, n_a: int, successes_b: int, n_b: int, alpha: float = 0.05
) -> Comparison:
    """Two-sided z-test of p_b == p_a, with a (1 - alpha) interval for p_b - p_a."""
    if n_a <= 0 or n_b <= 0:
        raise ValueError("both arms need samples")
    p_a, p_b = successes_a / n_a, successes_b / n_b
    pooled = (successes_a + successes_b) / (n_a + n_b)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    diff = p_b - p_a
    if se_pooled == 0:
        z, p_value = 0.0, 1.0
    else:
        z = diff / se_pooled
        p_value = float(2 * special.ndtr(-abs(z)))
    se = math.sqrt(p_a * (1 - p_a) / n_a + p_b * (1 - p_b) / n_b)
    half = float(special.ndtri(1 - alpha / 2)) * se
    return Comparison(
        "two_proportion_z", n_a, n_b, p_a, p_b, diff, diff - half, diff + half, p_value, z, alpha
    )


def welch_ttest(*, a: npt.ArrayLike, b: npt.ArrayLike, alpha: float = 0.05) -> Comparison:
    """Welch's two-sided t-test of mean_b == mean_a, with a (1 - alpha) interval."""
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.size < 2 or xb.size < 2:
        raise ValueError("both arms need at least two samples")
    va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
    diff = float(xb.mean() - xa.mean())
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison(
            "welch_t",
            xa.size,
            xb.size,
            float(xa.mean()),
            float(xb.mean()),
            diff,
            diff,
            diff,
            1.0 if diff == 0 else 0.0,
            0.0,
            alpha,
        )
    df = (va + vb) ** 2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1))
    t = diff / se
    # The Student t tail and quantile as scipy.special's ufuncs (what scipy.stats.t
    # computes, without its per-call overhead: experiments and simulations call this a lot).
    p_value = float(2 * special.stdtr(df, -abs(t)))
    half = float(special.stdtrit(df, 1 - alpha / 2)) * se
    return Comparison(
        "welch_t",
        xa.size,
        xb.size,
        float(xa.mean()),
        float(xb.mean()),
        diff,
        diff - half,
        diff + half,
        p_value,
        t,
        alpha,
    )


@dataclass(frozen=True)
class SequentialResult(Comparison):
    """An mSPRT look: `e_value` is Lambda; `p_value` is min(1, 1/Lambda) at this look."""

    e_value: float = 1.0
    tau: float = 0.0


def msprt(
    *,
    mean_a: float,
    var_a: float,
    n_a: int,
    mean_b: float,
    var_b: float,
    n_b: int,
    tau: float,
    alpha: float = 0.05,
) -> SequentialResult:
    """One look of the normal-mixture SPRT for mean_b - mean_a, with its confidence sequence.

    `var_a`/`var_b` are per-sample variances (p(1-p) for proportions). `tau` is the scale
    of effects the test is tuned to find (the sd of the mixing prior): the test is most
    powerful for differences near tau, and valid for any tau. The caller keeps the
    running minimum of `p_value` across looks: that minimum is the always-valid p-value.
    """
    if n_a <= 0 or n_b <= 0:
        raise ValueError("both arms need samples")
    if tau <= 0:
        raise ValueError("tau must be > 0")
    diff = mean_b - mean_a
    v = var_a / n_a + var_b / n_b
    tau2 = tau * tau
    if v <= 0:
        # No spread in either arm: any difference is certain, none is nothing.
        e = math.inf if diff != 0 else 1.0
        return SequentialResult(
            "msprt", n_a, n_b, mean_a, mean_b, diff, diff, diff, 0.0 if diff else 1.0, e, alpha, e, tau
        )
    # log Lambda, computed in logs: the exponent grows linearly with n and overflows a float.
    log_lambda = 0.5 * math.log(v / (v + tau2)) + diff * diff * tau2 / (2 * v * (v + tau2))
    e_value = math.exp(min(log_lambda, 700.0))
    p_value = min(1.0, math.exp(-log_lambda))
    half = math.sqrt(2 * v * (v + tau2) / tau2 * (math.log(1 / alpha) + 0.5 * math.log((v + tau2) / v)))
    return SequentialResult(
        "msprt",
        n_a,
        n_b,
        mean_a,
        mean_b,
        diff,
        diff - half,
        diff + half,
        p_value,
        log_lambda,
        alpha,
        e_value,
        tau,
    )


def msprt_samples(*, a: npt.ArrayLike, b: npt.ArrayLike, tau: float, alpha: float = 0.05) -> SequentialResult:
    """`msprt` from raw samples (0/1 values give the Bernoulli variance p(1-p))."""
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.size < 2 or xb.size < 2:
        raise ValueError("both arms need at least two samples")
    return msprt(
        mean_a=float(xa.mean()),
        var_a=float(xa.var(ddof=1)),
        n_a=int(xa.size),
        mean_b=float(xb.mean()),
        var_b=float(xb.var(ddof=1)),
        n_b=int(xb.size),
        tau=tau,
        alpha=alpha,
    )


@dataclass(frozen=True)
class DeviceLook:
    """One look at a treatment arm against control with each device one observation.

    Devices are what an experiment randomises, so they are the unit of analysis: the
    observations are the devices' own means, whose spread holds both the sampling noise
    and how much devices differ from one another. Treating every inference as
    independent instead counts a device's lasting quirks as evidence, and the more it
    reports the more certain such a test becomes of a difference that is not there.
    """

    sequential: SequentialResult
    fixed: Comparison
    always_valid_p: float  # the running minimum over this look and the earlier ones

    @property
    def significant(self) -> bool:
        return self.always_valid_p < self.sequential.alpha


def look_at_device_means(
    *, control: npt.ArrayLike, treatment: npt.ArrayLike, tau: float, alpha: float, previous_p: float = 1.0
) -> DeviceLook:
    """The mSPRT (always valid across looks) and Welch's t (fixed horizon, for reference)
    on per-device means; ``previous_p`` is the always-valid p-value of the earlier looks."""
    a = np.asarray(control, dtype=np.float64)
    b = np.asarray(treatment, dtype=np.float64)
    sequential = msprt_samples(a=a, b=b, tau=tau, alpha=alpha)
    fixed = welch_ttest(a=a, b=b, alpha=alpha)
    return DeviceLook(sequential, fixed, min(sequential.p_value, previous_p))
