"""Differential privacy on the server: Gaussian noise on the aggregate and an RDP
accountant.

The guarantee assumes the DP-FedAvg setting: every participant's delta is clipped to
L2 norm ``clip_norm`` (on the device with ``devices_agent.codecs.clip_by_norm``, and
again on the server with :func:`clip_update`, because a device may not clip honestly)
and the deltas are averaged with equal weights. One participant then moves the mean by
at most ``clip_norm / n``, so noise with ``sigma = noise_multiplier * clip_norm / n``
on the mean gives the Gaussian mechanism with that noise multiplier.

:class:`Privacy` is how a round asks for this: the mean family of aggregators applies it
(clipping, equal weights, noise on the mean delta before it reaches the global weights
or a server optimiser). Order statistics refuse the noise, whose calibration assumes a
mean.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .base import Weights


@dataclass(frozen=True)
class Privacy:
    """The server's half of DP-FedAvg, applied by the aggregator.

    ``clip_norm``: every accepted update is scaled to L2 norm at most ``clip_norm`` (again,
    after the device: a device may not clip honestly). ``noise_multiplier`` > 0: every
    update then counts equally whatever its reported weight (the sensitivity bound needs
    it) and the mean delta gets Gaussian noise with ``sigma = z * C / n``, drawn from
    :class:`SecureNormal` under ``key``: 32 random bytes the round keeps to itself, so a
    round aggregated again after a crash draws the same noise, and nobody who knows the
    job (its seed, the round number) can regenerate it and subtract it.
    """

    clip_norm: float
    noise_multiplier: float = 0.0
    key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError("clip_norm must be positive")
        if not (self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError("noise_multiplier must be >= 0")
        if self.key is not None and len(self.key) != 32:
            raise ValueError("the noise key must be 32 bytes")

    @property
    def adds_noise(self) -> bool:
        """Whether the mean is noised (clipping alone is not a privacy guarantee)."""
        return self.noise_multiplier > 0

    def clip(self, update: Mapping[str, npt.ArrayLike]) -> Weights:
        """``update`` scaled to L2 norm <= ``clip_norm``."""
        clipped, _ = clip_update(update, max_norm=self.clip_norm)
        return clipped

    def noised(self, mean_delta: Mapping[str, npt.ArrayLike], *, num_participants: int) -> Weights:
        """``mean_delta`` plus the noise of this round (unchanged without noise)."""
        if not self.adds_noise:
            return {name: np.asarray(t, dtype=np.float32) for name, t in mean_delta.items()}
        if self.key is None:
            raise ValueError("noise needs the round's secret key")
        return add_gaussian_noise(
            mean_delta,
            clip_norm=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            num_participants=num_participants,
            rng=SecureNormal(self.key),
        )


class SecureNormal:
    """Standard normal draws from a cryptographically secure stream (ChaCha20 under a key).

    numpy's generators are fast but predictable: their state follows from a few outputs
    or from the seed, so noise drawn from them can be reproduced and removed. Here the
    uniforms come from ChaCha20's keystream (53 bits each) and become normals by
    Box-Muller; the same key gives the same draws in the same order.
    """

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

        if len(key) != 32:
            raise ValueError("the key must be 32 bytes")
        self._stream = Cipher(algorithms.ChaCha20(key, b"\x00" * 16), mode=None).encryptor()

    def _uniform(self, count: int) -> npt.NDArray[np.float64]:
        raw = np.frombuffer(self._stream.update(bytes(8 * count)), dtype="<u8")
        # (0, 1]: never 0, whose logarithm Box-Muller takes.
        return ((raw >> np.uint64(11)).astype(np.float64) + 1.0) / float(2**53)

    def standard_normal(self, size: int | tuple[int, ...]) -> npt.NDArray[np.float64]:
        shape = (size,) if isinstance(size, int) else tuple(size)
        count = int(np.prod(shape, dtype=np.int64))
        pairs = (count + 1) // 2
        u1, u2 = self._uniform(pairs), self._uniform(pairs)
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = 2.0 * np.pi * u2
        values: npt.NDArray[np.float64] = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        return values[:count].reshape(shape)

    def normal(self, loc: float, scale: float, size: int | tuple[int, ...]) -> npt.NDArray[np.float64]:
        return loc + scale * self.standard_normal(size)


def clip_update(update: Mapping[str, npt.ArrayLike], *, max_norm: float) -> tuple[Weights, float]:
    """Scale all tensors together to global L2 norm <= ``max_norm``; returns
    ``(clipped, scale)``."""
    if not max_norm > 0:
        raise ValueError("max_norm must be positive")
    total = 0.0
    for t in update.values():
        flat = np.asarray(t, dtype=np.float64).ravel()
        total += float(np.dot(flat, flat))
    norm = math.sqrt(total)
    if not math.isfinite(norm):
        raise ValueError("cannot clip an update holding NaN or Inf")
    scale = 1.0 if norm <= max_norm else max_norm / norm
    clipped = {
        name: (np.asarray(t, dtype=np.float64) * scale).astype(np.float32) for name, t in update.items()
    }
    return clipped, scale


def noise_stddev(*, clip_norm: float, noise_multiplier: float, num_participants: int) -> float:
    """Standard deviation of the noise added to the mean: z * C / n."""
    if clip_norm <= 0 or noise_multiplier < 0 or num_participants < 1:
        raise ValueError("need clip_norm > 0, noise_multiplier >= 0, num_participants >= 1")
    return noise_multiplier * clip_norm / num_participants


def add_gaussian_noise(
    mean_update: Mapping[str, npt.ArrayLike],
    *,
    clip_norm: float,
    noise_multiplier: float,
    num_participants: int,
    rng: SecureNormal | np.random.Generator,
) -> Weights:
    """Return ``mean_update`` plus i.i.d. N(0, sigma^2) noise, sigma = z * C / n.

    Noise added to the new global weights is the same thing (they differ from the mean
    delta by a constant), so this may be applied to either. Rounds pass a
    :class:`SecureNormal`; a numpy generator is for experiments only (its noise can be
    regenerated by anyone who knows the seed). Tensors are noised in sorted name order,
    so the same key gives the same noise whatever order they come in.
    """
    sigma = noise_stddev(
        clip_norm=clip_norm, noise_multiplier=noise_multiplier, num_participants=num_participants
    )
    out: Weights = {}
    for name in sorted(mean_update):
        base = np.asarray(mean_update[name], dtype=np.float64)
        out[name] = (base + rng.normal(0.0, sigma, size=base.shape)).astype(np.float32)
    return out


def epsilon_for(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon spent after ``steps`` rounds of the Poisson-subsampled Gaussian mechanism
    (RDP accountant from ``dp_accounting``), for the given ``delta``.

    ``sample_rate`` is the probability that a device takes part in a round.
    """
    import dp_accounting
    from dp_accounting import rdp

    if noise_multiplier <= 0:
        return math.inf
    if not 0 < sample_rate <= 1 or steps < 0 or not 0 < delta < 1:
        raise ValueError("need 0 < sample_rate <= 1, steps >= 0, 0 < delta < 1")
    accountant = rdp.RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))
