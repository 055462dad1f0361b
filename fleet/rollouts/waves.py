"""Deterministic, stable wave membership and hash-based arm assignment.

Devices are ranked by `sha256(f"{salt}:{device_id}")`. A device's rank key never changes,
so the order of the devices already in a target is the same on every evaluation, and a
device that joins the target later slots into that order where its hash falls.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def rank_key(*, salt: int | str, device_id: str) -> str:
    """The hex SHA-256 of `"{salt}:{device_id}"`: the device's place in the order."""
    return hashlib.sha256(f"{salt}:{device_id}".encode()).hexdigest()


def ordered_devices(*, rollout_id: int, device_ids: Iterable[str]) -> list[str]:
    """Device ids sorted by their rank key for this rollout."""
    return sorted((str(d) for d in device_ids), key=lambda d: rank_key(salt=rollout_id, device_id=d))


def cumulative_size(*, wave: Mapping[str, Any], total: int) -> int:
    """How many devices have been exposed once this wave started.

    `{"percent": p}` means ceil(p% of the current target) and `{"count": n}` n devices;
    both are cumulative (2%, 10%, 50%, 100% exposes 2% first, then 10% in all). A
    non-empty target always exposes at least one device.
    """
    if total <= 0:
        return 0
    if "count" in wave and wave["count"] is not None:
        size = int(wave["count"])
    else:
        # Round before ceil so 10% of 50 devices is 5, not 6 from 5.000000000000001.
        size = math.ceil(round(float(wave["percent"]) * total / 100.0, 9))
    return max(1, min(total, size))


def wave_members(
    *, rollout_id: int, device_ids: Iterable[str], waves: Sequence[Mapping[str, Any]], wave_index: int
) -> list[str]:
    """The devices exposed up to and including wave `wave_index`, in rank order."""
    order = ordered_devices(rollout_id=rollout_id, device_ids=device_ids)
    return order[: cumulative_size(wave=waves[wave_index], total=len(order))]


def validate_waves(*, waves: Any) -> list[dict[str, Any]]:
    """Check and normalise a wave list; raises ValueError with a readable message."""
    if not isinstance(waves, list) or not waves:
        raise ValueError("waves must be a non-empty list")
    clean: list[dict[str, Any]] = []
    for i, wave in enumerate(waves):
        if not isinstance(wave, dict):
            raise ValueError(f"wave {i} must be an object")
        has_percent = wave.get("percent") is not None
        has_count = wave.get("count") is not None
        if has_percent == has_count:
            raise ValueError(f"wave {i} needs exactly one of percent or count")
        soak = float(wave.get("soak_s", 0))
        if soak < 0:
            raise ValueError(f"wave {i}: soak_s must be >= 0")
        if has_percent:
            percent = float(wave["percent"])
            if not 0 < percent <= 100:
                raise ValueError(f"wave {i}: percent must be in (0, 100]")
            clean.append({"percent": percent, "soak_s": soak})
        else:
            count = int(wave["count"])
            if count < 1:
                raise ValueError(f"wave {i}: count must be >= 1")
            clean.append({"count": count, "soak_s": soak})
    return clean


def unit_interval(*, salt: int | str, device_id: str) -> float:
    """The device's hash mapped to [0, 1), uniform over devices, stable per salt."""
    # 53 bits fill a double's mantissa exactly, so the value is uniform and never 1.0.
    return (int(rank_key(salt=salt, device_id=device_id)[:14], 16) >> 3) / float(1 << 53)


def assign_arm(*, experiment_id: int, device_id: str, shares: Sequence[float]) -> int:
    """The arm index of a device: its hash in [0, 1) mapped by cumulative share."""
    u = unit_interval(salt=f"exp{experiment_id}", device_id=device_id)
    total = float(sum(shares))
    acc = 0.0
    for index, share in enumerate(shares):
        acc += share / total
        if u < acc:
            return index
    return len(shares) - 1
