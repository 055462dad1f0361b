"""Pairwise additive masking (the core of Bonawitz et al. 2017 secure aggregation).

Every pair of participants (a, b) shares a seed. Each participant turns its update into
fixed-point integers modulo 2**64 and adds, for every peer, the pseudo-random mask of
their shared seed: added by the participant whose id sorts first, subtracted by the
other. A single masked update looks uniformly random to the server, yet in the sum
every mask appears once with each sign and cancels exactly, because all arithmetic is
modulo 2**64 (unsigned numpy integers wrap around). Floats would not cancel exactly.

Not covered here: key agreement (in a deployment each pair seed comes from a
Diffie-Hellman exchange between the two devices, never known to the server) and
recovery from participants that drop out after masking (which needs secret-shared
seeds). :func:`pair_seed` derives seeds from one shared secret, for simulations and
tests only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from .base import Weights

Masked = dict[str, npt.NDArray[np.uint64]]

DEFAULT_FRAC_BITS = 24


def pair_seed(*, secret: bytes, a: str, b: str) -> int:
    """Seed shared by participants ``a`` and ``b`` (symmetric in a and b)."""
    first, second = sorted((a, b))
    digest = hashlib.sha256(secret + b"\x00" + first.encode() + b"\x00" + second.encode())
    return int.from_bytes(digest.digest()[:16], "little")


def _masks(seed: int, shapes: Mapping[str, tuple[int, ...]]) -> Masked:
    # One generator per pair, tensors drawn in sorted-name order, so both members of the
    # pair produce the identical stream.
    generator = np.random.Generator(np.random.PCG64(seed))
    out: Masked = {}
    for name in sorted(shapes):
        size = int(np.prod(shapes[name], dtype=np.int64))
        out[name] = generator.bit_generator.random_raw(size).reshape(shapes[name])
    return out


def _to_fixed(values: npt.ArrayLike, frac_bits: int) -> npt.NDArray[np.uint64]:
    scaled = np.rint(np.asarray(values, dtype=np.float64) * float(2**frac_bits))
    # Two's complement reinterpretation: negative values wrap to large unsigned ones and
    # come back negative after the modular sum is viewed as int64.
    return scaled.astype(np.int64).view(np.uint64)


def mask_update(
    update: Mapping[str, npt.ArrayLike],
    *,
    client_id: str,
    peer_seeds: Mapping[str, int],
    frac_bits: int = DEFAULT_FRAC_BITS,
) -> Masked:
    """Fixed-point encode ``update`` and add the pairwise masks for every peer.

    ``peer_seeds`` maps each other participant's id to the seed shared with it. Values
    must satisfy ``n * max|x| * 2**frac_bits < 2**63`` so the sum does not overflow.
    """
    if client_id in peer_seeds:
        raise ValueError("a participant is not its own peer")
    shapes = {name: tuple(np.shape(t)) for name, t in update.items()}
    masked = {name: _to_fixed(t, frac_bits) for name, t in update.items()}
    for peer, seed in peer_seeds.items():
        masks = _masks(seed, shapes)
        for name, mask in masks.items():
            if client_id < peer:
                masked[name] += mask
            else:
                masked[name] -= mask
    return masked


def unmask_sum(
    masked: Sequence[Mapping[str, npt.ArrayLike]], *, frac_bits: int = DEFAULT_FRAC_BITS
) -> Weights:
    """Sum masked updates from *every* participant: the masks cancel, leaving the sum
    of the fixed-point updates, returned as float32."""
    if not masked:
        raise ValueError("no masked updates")
    total = {name: np.zeros(np.shape(t), dtype=np.uint64) for name, t in masked[0].items()}
    for update in masked:
        if set(update) != set(total):
            raise ValueError("masked updates do not hold the same tensors")
        for name, acc in total.items():
            acc += np.asarray(update[name], dtype=np.uint64)
    scale = float(2**frac_bits)
    return {
        name: (acc.view(np.int64).astype(np.float64) / scale).astype(np.float32)
        for name, acc in total.items()
    }
