"""Can a board run a version? Pure rules over the facts the board reported and the ONNX file.

Boards answer inferences in ONNX Runtime, so shipping needs the version's ONNX graph and
nothing of torch (a board's training backends matter to a federated round, not here).
What a board reports decides the rest, and a fact it did not report never excludes it:

- ``onnxruntime_too_old``: the board's ONNX Runtime (``hardware["onnxruntime"]``) is older
  than the first release that implements the graph's opset (:data:`ORT_MAX_OPSET`);
- ``insufficient_ram``: the board's RAM (``ram_mb``) is under :data:`RAM_FACTOR` times the
  graph's size (the session holds the weights, their initialised copy and the arena);
- ``decommissioned``: the board is retired.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# The highest ONNX opset each ONNX Runtime release implements (onnxruntime.ai, "ONNX
# Runtime compatibility"). Releases after the last row are taken to run any opset.
ORT_MAX_OPSET: tuple[tuple[tuple[int, int], int], ...] = (
    ((1, 6), 12),
    ((1, 7), 13),
    ((1, 8), 14),
    ((1, 10), 15),
    ((1, 11), 16),
    ((1, 13), 17),
    ((1, 14), 18),
    ((1, 16), 19),
    ((1, 17), 20),
    ((1, 18), 21),
)
RAM_FACTOR = 3.0
REASONS = ("onnxruntime_too_old", "insufficient_ram", "decommissioned")


def _release(text: str) -> tuple[int, int] | None:
    parts = str(text).strip().split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def max_opset(ort_version: str) -> int | None:
    """The highest opset an ONNX Runtime release runs; None when unknown or newer than the table."""
    release = _release(ort_version)
    if release is None or release > ORT_MAX_OPSET[-1][0]:
        return None
    supported = 0
    for first, opset in ORT_MAX_OPSET:
        if release >= first:
            supported = opset
    return supported or ORT_MAX_OPSET[0][1] - 1


def cannot_run(*, facts: Mapping[str, Any], opset: int | None, onnx_bytes: int) -> str:
    """Why a board cannot run the graph ("" when it can, or when its facts do not say).

    ``facts``: ``status``, ``ram_mb`` and ``hardware`` (the board's further facts).
    """
    if facts.get("status") == "decommissioned":
        return "decommissioned"
    hardware = facts.get("hardware") or {}
    ort = hardware.get("onnxruntime") if isinstance(hardware, Mapping) else None
    if opset is not None and ort:
        limit = max_opset(str(ort))
        if limit is not None and opset > limit:
            return "onnxruntime_too_old"
    ram_mb = facts.get("ram_mb")
    if ram_mb and onnx_bytes and onnx_bytes * RAM_FACTOR > float(ram_mb) * 1e6:
        return "insufficient_ram"
    return ""


def explain(reason: str, *, opset: int | None, onnx_bytes: int) -> str:
    """A reason code in words, with the numbers."""
    if reason == "onnxruntime_too_old":
        return f"ONNX Runtime older than the first release that runs opset {opset}"
    if reason == "insufficient_ram":
        return f"less RAM than {RAM_FACTOR:g} x the {onnx_bytes / 1e6:.1f} MB graph"
    if reason == "decommissioned":
        return "decommissioned"
    return reason
