"""Pairwise additive masking: masks cancel exactly in the sum."""

from __future__ import annotations

import numpy as np
import pytest

from training.aggregation.secagg import mask_update, pair_seed, unmask_sum


def participants(n: int) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(3)
    ids = [f"device-{i:02d}" for i in range(n)]
    ups = [
        {"w": rng.normal(size=(4, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
        for _ in ids
    ]
    return ids, ups


def masked_all(ids: list[str], ups: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    secret = b"round-7-shared-secret"
    out = []
    for me, update in zip(ids, ups, strict=True):
        seeds = {peer: pair_seed(secret=secret, a=me, b=peer) for peer in ids if peer != me}
        out.append(mask_update(update, client_id=me, peer_seeds=seeds))
    return out


def test_masked_sum_equals_plain_sum() -> None:
    ids, ups = participants(6)
    total = unmask_sum(masked_all(ids, ups))
    for name in ("w", "b"):
        plain = np.sum([u[name].astype(np.float64) for u in ups], axis=0)
        # Exact up to fixed-point rounding: 6 values, each within half of 2**-24.
        np.testing.assert_allclose(total[name], plain, rtol=0, atol=6 * 2.0**-25 + 1e-6)


def test_masks_hide_each_update_and_need_everyone() -> None:
    ids, ups = participants(4)
    masked = masked_all(ids, ups)
    fixed = np.rint(ups[0]["w"].astype(np.float64) * 2**24).astype(np.int64)
    assert not np.any(masked[0]["w"].view(np.int64) == fixed)
    # Without one participant the masks no longer cancel: the result is garbage.
    partial = unmask_sum(masked[:-1])
    plain = np.sum([u["w"] for u in ups[:-1]], axis=0)
    assert np.abs(partial["w"] - plain).max() > 1e3


def test_pair_seed_is_symmetric_and_distinct() -> None:
    s = b"secret"
    assert pair_seed(secret=s, a="x", b="y") == pair_seed(secret=s, a="y", b="x")
    assert pair_seed(secret=s, a="x", b="y") != pair_seed(secret=s, a="x", b="z")
    with pytest.raises(ValueError):
        mask_update({"w": np.zeros(2)}, client_id="x", peer_seeds={"x": 1})
