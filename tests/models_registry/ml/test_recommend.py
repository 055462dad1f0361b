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
    best = recommend_variant(
        variants=variants, latency_budget_us=20.0, min_accuracy=None, reference_accuracy=0.975
    )
    assert best is not None and best["variant"] == "int8"
    decisions = {v["variant"]: v["decision"] for v in variants}
    assert decisions == {"fp32": "eligible", "int8": "recommended", "tiny": "rejected", "fp16": "eligible"}
    assert "accuracy 0.9000 below 0.9650" in variants[2]["reason"]


def test_latency_budget_excludes_slow_variants() -> None:
    variants = _variants()
    best = recommend_variant(
        variants=variants, latency_budget_us=10.0, min_accuracy=None, reference_accuracy=0.975
    )
    assert best is not None and best["variant"] == "fp16"
    assert "over budget" in variants[1]["reason"]


def test_min_accuracy_and_impossible_budget() -> None:
    best = recommend_variant(
        variants=_variants(), latency_budget_us=20.0, min_accuracy=0.974, reference_accuracy=0.975
    )
    assert best is not None and best["variant"] == "fp16"
    assert (
        recommend_variant(
            variants=_variants(), latency_budget_us=1.0, min_accuracy=None, reference_accuracy=0.975
        )
        is None
    )
    with pytest.raises(ValueError):
        recommend_variant(variants=[], latency_budget_us=0.0, min_accuracy=None, reference_accuracy=1.0)
