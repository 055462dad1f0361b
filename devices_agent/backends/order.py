"""The order a round's seed shuffles the local examples in, without torch.

The PyTorch backend draws each epoch's order with
``torch.randperm(n, generator=torch.Generator().manual_seed(seed))``. A backend without
torch draws the same orders here: torch's CPU generator is the standard 32-bit Mersenne
Twister seeded like ``init_genrand`` (numpy's ``MT19937`` legacy seeding), and its
``randperm`` is a Fisher-Yates pass taking one 32-bit draw per position,
``i <-> i + draw % (n - i)``. Same seed, same data order under either backend: that is
what lets the two be compared parameter for parameter (the parity tests check this
against torch itself).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt

__all__ = ["epoch_orders"]


def epoch_orders(n: int, seed: int) -> Iterator[npt.NDArray[np.int64]]:
    """One permutation of ``range(n)`` per epoch, as successive ``torch.randperm`` calls give."""
    if not 0 <= seed < 2**32:
        raise ValueError("the seed must fit in 32 bits")
    generator = np.random.MT19937(0)
    generator._legacy_seeding(int(seed))
    while True:
        order = np.arange(n, dtype=np.int64)
        draws = generator.random_raw(max(n - 1, 0))
        for i in range(n - 1):
            j = i + int(draws[i]) % (n - i)
            order[i], order[j] = order[j], order[i]
        yield order
