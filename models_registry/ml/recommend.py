"""Pick the variant of a model version to ship to boards under a latency budget."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["apply_fleet_latency", "recommend_variant"]


def apply_fleet_latency(
    *,
    variants: list[dict[str, Any]],
    fleet_latency: Mapping[int, tuple[float, int]],
    min_samples: int = 50,
) -> None:
    """Replace the server latency of each variant by the on-device one when enough samples exist.

    ``fleet_latency`` maps a ``version_id`` to ``(p50_ms, n_samples)`` measured by boards of
    one hardware profile. A variant with at least ``min_samples`` samples gets
    ``p50_batch1_us = p50_ms * 1000`` and ``latency_source = "fleet"``; any other keeps its
    server measurement with ``latency_source = "server"``, because a median of a handful of
    samples from a board that was also busy doing something else says less than a clean
    measurement on the server. Every dict is annotated in place with ``latency_source``,
    ``latency_samples`` (the on-device count, 0 if none), ``server_p50_batch1_us`` and
    ``fleet_p50_batch1_us`` (``None`` without samples).
    """
    if min_samples < 1:
        raise ValueError("min_samples must be at least 1")
    for variant in variants:
        server = variant.get("p50_batch1_us")
        variant["server_p50_batch1_us"] = server
        p50_ms, count = fleet_latency.get(int(variant["version_id"]), (math.nan, 0))
        variant["latency_samples"] = int(count)
        variant["fleet_p50_batch1_us"] = float(p50_ms) * 1000.0 if count else None
        if count >= min_samples and math.isfinite(p50_ms):
            variant["p50_batch1_us"] = float(p50_ms) * 1000.0
            variant["latency_source"] = "fleet"
        else:
            variant["latency_source"] = "server"


def recommend_variant(
    *,
    variants: list[dict[str, Any]],
    latency_budget_us: float,
    min_accuracy: float | None,
    max_accuracy_drop: float = 0.01,
    reference_accuracy: float,
) -> dict[str, Any] | None:
    """Return the smallest variant that is fast enough and accurate enough, or ``None``.

    Each variant dict needs ``accuracy``, ``size_bytes`` and ``p50_batch1_us``: the budget
    is checked against the median single-example latency, because boards classify one
    input at a time and the median is what a steady stream of requests sees (the p95 is
    reported alongside for gates that care about tails). A variant is eligible when
    ``p50_batch1_us <= latency_budget_us``, ``accuracy >= reference_accuracy -
    max_accuracy_drop`` and, if given, ``accuracy >= min_accuracy``. Among eligible
    variants the one with the fewest bytes wins; ties go to the faster one.

    Every dict in ``variants`` is annotated in place: ``decision`` is ``"recommended"``,
    ``"eligible"`` or ``"rejected"``, and ``reason`` says why (with the numbers).
    """
    if not latency_budget_us > 0:
        raise ValueError("latency_budget_us must be positive")
    if max_accuracy_drop < 0:
        raise ValueError("max_accuracy_drop must not be negative")
    floor = reference_accuracy - max_accuracy_drop
    if min_accuracy is not None:
        floor = max(floor, min_accuracy)
    eligible: list[dict[str, Any]] = []
    for variant in variants:
        accuracy = float(variant["accuracy"])
        latency = float(variant["p50_batch1_us"])
        reasons = []
        if not math.isfinite(accuracy) or accuracy < floor:
            reasons.append(
                f"accuracy {accuracy:.4f} below {floor:.4f} "
                f"(reference {reference_accuracy:.4f}, allowed drop {max_accuracy_drop:.4f}"
                + (f", minimum {min_accuracy:.4f})" if min_accuracy is not None else ")")
            )
        if not math.isfinite(latency) or latency > latency_budget_us:
            reasons.append(f"p50 batch-1 latency {latency:.1f} us over budget {latency_budget_us:.1f} us")
        if reasons:
            variant["decision"] = "rejected"
            variant["reason"] = "; ".join(reasons)
        else:
            variant["decision"] = "eligible"
            variant["reason"] = f"meets budget ({latency:.1f} us) and accuracy ({accuracy:.4f})"
            eligible.append(variant)
    if not eligible:
        return None
    best = min(eligible, key=lambda v: (int(v["size_bytes"]), float(v["p50_batch1_us"])))
    best["decision"] = "recommended"
    best["reason"] = (
        f"smallest eligible ({int(best['size_bytes'])} bytes); "
        f"p50 {float(best['p50_batch1_us']):.1f} us <= {latency_budget_us:.1f} us, "
        f"accuracy {float(best['accuracy']):.4f} >= {floor:.4f}"
    )
    return best
