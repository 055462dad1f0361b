"""The closed-loop drill's pure parts: the sensor remount, the deranged output layer, the
decision lines and the verdict."""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks.closed_loop import decision_line, permute_output, remount, summary


def test_remount_moves_the_channel_means_and_keeps_the_shape() -> None:
    from devices_agent.data import activity_windows

    x, _ = activity_windows(user=0, n=50, seed=0, style=False)
    moved = remount(x)
    assert moved.shape == x.shape and moved.dtype == np.float32
    shift = np.abs(moved.mean(axis=(0, 2)) - x.mean(axis=(0, 2)))
    assert shift.max() > 0.5
    assert np.allclose(remount(x[0]), moved[0])


def test_permuted_output_answers_every_class_as_another() -> None:
    rng = np.random.default_rng(0)
    weights = {
        "conv.weight": rng.standard_normal((6, 3, 5)).astype(np.float32),
        "fc.weight": rng.standard_normal((6, 32)).astype(np.float32),
        "fc.bias": rng.standard_normal(6).astype(np.float32),
    }
    bad = permute_output(weights, classes=6)
    features = rng.standard_normal((200, 32)).astype(np.float32)
    good_answer = np.argmax(features @ weights["fc.weight"].T + weights["fc.bias"], axis=1)
    bad_answer = np.argmax(features @ bad["fc.weight"].T + bad["fc.bias"], axis=1)
    assert not np.any(good_answer == bad_answer)
    assert np.array_equal(bad["conv.weight"], weights["conv.weight"])
    assert sorted(map(tuple, bad["fc.weight"].tolist())) == sorted(map(tuple, weights["fc.weight"].tolist()))


def test_decision_line_carries_the_numbers() -> None:
    line = decision_line(
        "rollout 3 wave 1",
        "shadow_failed",
        "candidate below the active version",
        {
            "median_diff": -0.61234,
            "devices": 8,
            "gates": [{"metric": "accuracy", "value": 0.1, "baseline_value": 0.9, "outcome": "fail"}],
            "flag": True,
        },
    )
    assert "shadow_failed" in line and "median_diff=-0.612" in line and "devices=8" in line
    assert "accuracy 0.1 vs 0.9 [fail]" in line
    assert "flag" not in line


def test_summary_closes_the_loop_only_when_every_board_runs_the_promoted_version() -> None:
    common: dict[str, Any] = {
        "bad_exposed": {"a", "b"},
        "bad_left": 0,
        "bad_stopped_in": "shadow",
        "decisions": 7,
    }
    done = summary(
        injected_at=60.0, promoted_at=420.0, good_promoted=True, every_board_on_good=True, **common
    )
    assert done["loop_closed"] and done["loop_minutes"] == 6.0
    assert done["bad_devices_exposed"] == 2 and done["bad_rolled_back_everywhere"]
    partial = summary(
        injected_at=60.0, promoted_at=420.0, good_promoted=True, every_board_on_good=False, **common
    )
    assert not partial["loop_closed"] and partial["loop_minutes"] is None
    left = summary(
        **{**common, "bad_left": 1},
        injected_at=None,
        promoted_at=None,
        good_promoted=False,
        every_board_on_good=False,
    )
    assert not left["bad_rolled_back_everywhere"] and not left["loop_closed"]
