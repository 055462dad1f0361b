"""The shadow phase of a rollout: its policy, and the verdict on a shadow's per-device figures.

A rollout with a shadow policy starts by running its candidate in shadow on its target
(`fleet.services.shadows`): the boards answer their applications with the version they
run and score the candidate on the same inputs. The first wave opens only once the
shadow passes.

Devices are the unit, as in every other decision here: a device votes once it has
``min_samples`` labelled shadow predictions (feedback), with its candidate-minus-active
difference on those same windows; the verdict waits for ``min_devices`` votes and is
the median of them, so no one device decides. It is taken once, the first time there
are enough votes (one look, so the error rate is the test's own; repeated looks would
need a sequential correction). Classification compares accuracy (``max_drop`` is in
accuracy points); regression compares mae (``max_drop`` is the relative rise allowed:
0.1 is 10 %). ``min_agreement`` (optional) also fails a candidate whose answers agree
with the active version's less often than that (median over devices with
``min_samples`` shadowed predictions); with it, a fleet whose applications send no
feedback can still be judged, on agreement alone. No verdict after ``timeout_s``:
``on_timeout`` says whether the waves open anyway (``continue``: the control cohort
still guards them) or the rollout stops (``stop``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["ShadowPolicy", "ShadowVerdict", "judge_shadow", "validate_shadow_policy"]

ON_TIMEOUT = ("continue", "stop")
MAX_TIMEOUT_S = 30 * 24 * 3600


@dataclass(frozen=True)
class ShadowPolicy:
    sample_rate: float = 1.0
    min_devices: int = 3
    min_samples: int = 10
    max_drop: float = 0.02
    min_agreement: float | None = None
    timeout_s: int = 3600
    on_timeout: str = "continue"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(data: Mapping[str, Any], key: str, default: Any, *, low: float, high: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"shadow.{key} must be a finite number.")
    if not low <= float(value) <= high:
        raise ValueError(f"shadow.{key} must be between {low:g} and {high:g}.")
    return float(value)


def validate_shadow_policy(value: Any) -> dict[str, Any]:
    """The stored form of a shadow policy: {} for none (None or False), defaults filled in.

    Raises ValueError naming the field for anything else than an object of known keys
    with values in range.
    """
    if value is None or value is False:
        return {}
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise ValueError("shadow must be an object, or false for no shadow phase.")
    known = set(ShadowPolicy.__dataclass_fields__)
    unknown = sorted(set(value) - known)
    if unknown:
        raise ValueError(f"Unknown shadow field(s): {', '.join(map(str, unknown))}.")
    default = ShadowPolicy()
    agreement = value.get("min_agreement")
    on_timeout = value.get("on_timeout", default.on_timeout)
    if on_timeout not in ON_TIMEOUT:
        raise ValueError(f"shadow.on_timeout must be one of {', '.join(ON_TIMEOUT)}.")
    policy = ShadowPolicy(
        sample_rate=_number(value, "sample_rate", default.sample_rate, low=0.0, high=1.0),
        min_devices=int(_number(value, "min_devices", default.min_devices, low=1, high=100_000)),
        min_samples=int(_number(value, "min_samples", default.min_samples, low=1, high=1_000_000)),
        max_drop=_number(value, "max_drop", default.max_drop, low=0.0, high=1.0),
        min_agreement=None
        if agreement is None
        else _number(value, "min_agreement", agreement, low=0.0, high=1.0),
        timeout_s=int(_number(value, "timeout_s", default.timeout_s, low=1, high=MAX_TIMEOUT_S)),
        on_timeout=str(on_timeout),
    )
    if policy.sample_rate <= 0:
        raise ValueError("shadow.sample_rate must be above 0: a shadow that sees no input never passes.")
    return policy.as_dict()


@dataclass(frozen=True)
class ShadowVerdict:
    """``outcome``: passed, failed, waiting or timed_out; ``numbers``: what it rests on."""

    outcome: str
    reason: str
    numbers: dict[str, Any]


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def judge_shadow(
    *, rows: Sequence[Mapping[str, Any]], policy: Mapping[str, Any], task: str, elapsed_s: float
) -> ShadowVerdict:
    """The verdict on a shadow's per-device rows (``fleet.selectors.shadows.shadow_report``)."""
    p = ShadowPolicy(**policy)
    mine, theirs = ("accuracy", "active_accuracy") if task == "classification" else ("mae", "active_mae")
    paired: list[float] = []
    for row in rows:
        a, b = row.get(mine), row.get(theirs)
        if a is None or b is None:
            continue
        if min(int(row.get(f"{mine}_samples") or 0), int(row.get(f"{theirs}_samples") or 0)) < p.min_samples:
            continue
        if task == "classification":
            paired.append(float(a) - float(b))
        else:
            # The relative rise of the candidate's error over the active's on the same inputs.
            paired.append((float(a) - float(b)) / max(abs(float(b)), 1e-9))
    agreements = [
        float(row["agreement"])
        for row in rows
        if row.get("agreement") is not None and int(row.get("agreement_samples") or 0) >= p.min_samples
    ]
    numbers: dict[str, Any] = {
        "devices": len(rows),
        "voting_devices": len(paired),
        "min_devices": p.min_devices,
        "min_samples": p.min_samples,
        "metric": mine,
        "median_difference": _median(paired),
        "max_drop": p.max_drop,
        "candidate": _median([float(r[mine]) for r in rows if r.get(mine) is not None]),
        "active": _median([float(r[theirs]) for r in rows if r.get(theirs) is not None]),
        "agreement": _median(agreements),
        "agreement_devices": len(agreements),
        "min_agreement": p.min_agreement,
        "latency_ms": _median([float(r["latency_ms"]) for r in rows if r.get("latency_ms") is not None]),
        "elapsed_s": round(elapsed_s, 1),
    }
    failures: list[str] = []
    by_metric = len(paired) >= p.min_devices
    by_agreement = p.min_agreement is not None and len(agreements) >= p.min_devices
    if by_metric:
        diff = float(numbers["median_difference"])
        if task == "classification" and diff < -p.max_drop:
            failures.append(
                f"accuracy {diff:+.3f} against the active version (median of {len(paired)} devices; "
                f"at most -{p.max_drop:g} allowed)"
            )
        if task != "classification" and diff > p.max_drop:
            failures.append(
                f"mae {diff:+.1%} against the active version (median of {len(paired)} devices; "
                f"at most +{p.max_drop:.0%} allowed)"
            )
    if by_agreement and float(numbers["agreement"]) < float(p.min_agreement or 0):
        failures.append(
            f"agreement {numbers['agreement']:.3f} with the active version (median of {len(agreements)} "
            f"devices; at least {p.min_agreement:g} required)"
        )
    if failures:
        return ShadowVerdict("failed", "; ".join(failures), numbers)
    if by_metric:
        return ShadowVerdict(
            "passed",
            f"{mine} {numbers['median_difference']:+.3f} against the active version, median of "
            f"{len(paired)} devices",
            numbers,
        )
    # Agreement alone passes only a fleet that sends no feedback at all: where labels do
    # arrive, the verdict waits for them.
    labelled = any(int(r.get(f"{mine}_samples") or 0) for r in rows)
    if by_agreement and not labelled:
        return ShadowVerdict(
            "passed", f"agreement {numbers['agreement']:.3f}, median of {len(agreements)} devices", numbers
        )
    if elapsed_s >= p.timeout_s:
        return ShadowVerdict(
            "timed_out",
            f"{len(paired)} of the {p.min_devices} devices needed had {p.min_samples} labelled shadow "
            f"predictions after {p.timeout_s} s",
            numbers,
        )
    return ShadowVerdict("waiting", "", numbers)
