"""Pick the variant of a model version to ship to boards under a latency budget and a metric drop."""

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
    reference: float,
    max_drop: float = 0.01,
    metric: str = "accuracy",
    higher_is_better: bool = True,
    limit: float | None = None,
) -> dict[str, Any] | None:
    """Return the smallest variant that is fast enough and good enough, or ``None``.

    Each variant dict needs ``metric`` (the family's primary metric: ``accuracy``, higher
    is better, or ``mae``, lower is better), ``size_bytes`` and ``p50_batch1_us``: the
    budget is checked against the median single-example latency, because boards answer
    one input at a time and the median is what a steady stream of requests sees (the p95
    is reported alongside for gates that care about tails). A variant is eligible when
    ``p50_batch1_us <= latency_budget_us`` and its metric is at most ``max_drop`` worse
    than ``reference`` (the base version's) and, if given, no worse than ``limit`` (a
    minimum accuracy, or a maximum mae). Among eligible variants the one with the fewest
    bytes wins; ties go to the faster one.

    Every dict in ``variants`` is annotated in place: ``decision`` is ``"recommended"``,
    ``"eligible"`` or ``"rejected"``, and ``reason`` says why (with the numbers).
    """
    if not latency_budget_us > 0:
        raise ValueError("latency_budget_us must be positive")
    if max_drop < 0:
        raise ValueError("the allowed metric drop must not be negative")
    if higher_is_better:
        bound = reference - max_drop if limit is None else max(reference - max_drop, limit)
    else:
        bound = reference + max_drop if limit is None else min(reference + max_drop, limit)
    side, word = ("below", "drop") if higher_is_better else ("above", "increase")
    eligible: list[dict[str, Any]] = []
    for variant in variants:
        value = float(variant[metric]) if variant.get(metric) is not None else math.nan
        latency = float(variant["p50_batch1_us"])
        reasons = []
        worse = value < bound if higher_is_better else value > bound
        if not math.isfinite(value) or worse:
            reasons.append(
                f"{metric} {value:.4f} {side} {bound:.4f} "
                f"(reference {reference:.4f}, allowed {word} {max_drop:.4f}"
                + (
                    f", {'minimum' if higher_is_better else 'maximum'} {limit:.4f})"
                    if limit is not None
                    else ")"
                )
            )
        if not math.isfinite(latency) or latency > latency_budget_us:
            reasons.append(f"p50 batch-1 latency {latency:.1f} us over budget {latency_budget_us:.1f} us")
        if reasons:
            variant["decision"] = "rejected"
            variant["reason"] = "; ".join(reasons)
        else:
            variant["decision"] = "eligible"
            variant["reason"] = f"meets budget ({latency:.1f} us) and {metric} ({value:.4f})"
            eligible.append(variant)
    if not eligible:
        return None
    best = min(eligible, key=lambda v: (int(v["size_bytes"]), float(v["p50_batch1_us"])))
    best["decision"] = "recommended"
    relation = ">=" if higher_is_better else "<="
    best["reason"] = (
        f"smallest eligible ({int(best['size_bytes'])} bytes); "
        f"p50 {float(best['p50_batch1_us']):.1f} us <= {latency_budget_us:.1f} us, "
        f"{metric} {float(best[metric]):.4f} {relation} {bound:.4f}"
    )
    return best
