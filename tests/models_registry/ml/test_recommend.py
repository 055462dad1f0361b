from __future__ import annotations

from typing import Any

import pytest

from models_registry.ml.recommend import recommend_variant


def _variants() -> list[dict[str, Any]]:
    return [
        {"variant": "fp32", "accuracy": 0.975, "size_bytes": 36000, "p50_batch1_us": 8.0},
        {"variant": "int8", "accuracy": 0.972, "size_bytes": 11000, "p50_batch1_us": 12.0},
        {"variant": "tiny", "accuracy": 0.90, "size_bytes": 3000, "p50_batch1_us": 5.0},
        {"variant": "fp16", "accuracy": 0.975, "size_bytes": 18000, "p50_batch1_us": 8.5},
    ]


def test_smallest_variant_within_budget_and_accuracy_wins() -> None:
    variants = _variants()
    best = recommend_variant(variants=variants, latency_budget_us=20.0, reference=0.975)
    assert best is not None and best["variant"] == "int8"
    decisions = {v["variant"]: v["decision"] for v in variants}
    assert decisions == {"fp32": "eligible", "int8": "recommended", "tiny": "rejected", "fp16": "eligible"}
    assert "accuracy 0.9000 below 0.9650" in variants[2]["reason"]


def test_latency_budget_excludes_slow_variants() -> None:
    variants = _variants()
    best = recommend_variant(variants=variants, latency_budget_us=10.0, reference=0.975)
    assert best is not None and best["variant"] == "fp16"
    assert "over budget" in variants[1]["reason"]


def test_min_accuracy_and_impossible_budget() -> None:
    best = recommend_variant(variants=_variants(), latency_budget_us=20.0, reference=0.975, limit=0.974)
    assert best is not None and best["variant"] == "fp16"
    assert recommend_variant(variants=_variants(), latency_budget_us=1.0, reference=0.975) is None
    with pytest.raises(ValueError):
        recommend_variant(variants=[], latency_budget_us=0.0, reference=1.0)


def test_lower_is_better_metrics_bound_the_increase() -> None:
    variants = [
        {"variant": "fp32", "mae": 0.20, "size_bytes": 36000, "p50_batch1_us": 8.0},
        {"variant": "int8", "mae": 0.205, "size_bytes": 11000, "p50_batch1_us": 9.0},
        {"variant": "tiny", "mae": 0.40, "size_bytes": 3000, "p50_batch1_us": 5.0},
    ]
    best = recommend_variant(
        variants=variants,
        latency_budget_us=20.0,
        reference=0.20,
        max_drop=0.01,
        metric="mae",
        higher_is_better=False,
    )
    assert best is not None and best["variant"] == "int8"
    assert "mae 0.4000 above 0.2100" in variants[2]["reason"] and "allowed increase" in variants[2]["reason"]
    capped = recommend_variant(
        variants=variants,
        latency_budget_us=20.0,
        reference=0.20,
        max_drop=0.01,
        metric="mae",
        higher_is_better=False,
        limit=0.202,
    )
    assert capped is not None and capped["variant"] == "fp32"


def test_apply_fleet_latency_uses_enough_on_device_samples_only() -> None:
    from models_registry.ml.recommend import apply_fleet_latency

    variants = [
        {"version_id": 1, "p50_batch1_us": 100.0},
        {"version_id": 2, "p50_batch1_us": 80.0},
        {"version_id": 3, "p50_batch1_us": 70.0},
    ]
    apply_fleet_latency(variants=variants, fleet_latency={1: (0.25, 50), 2: (0.5, 49)}, min_samples=50)
    assert variants[0]["latency_source"] == "fleet" and variants[0]["p50_batch1_us"] == 250.0
    assert variants[0]["server_p50_batch1_us"] == 100.0
    assert variants[1]["latency_source"] == "server" and variants[1]["p50_batch1_us"] == 80.0
    assert variants[1]["latency_samples"] == 49 and variants[1]["fleet_p50_batch1_us"] == 500.0
    assert variants[2]["latency_samples"] == 0 and variants[2]["fleet_p50_batch1_us"] is None
