"""What a board installs: the agent's dependencies, at the versions the server is pinned to.

Every pin lives in ``pyproject.toml``; :mod:`core.pins` reads them from the installed
distribution, so a board gets exactly the versions the server runs and was tested with.

- The *runtime* set is what the agent imports when it serves models (:data:`RUNTIME`).
- Training adds ``torch`` (choice ``torch``), or swaps ``onnxruntime`` for
  ``onnxruntime-training-cpu`` from the ``board-ort`` extra (choice ``onnxruntime``): both
  distributions provide the ``onnxruntime`` module, so a board never gets the two.
- ``auto`` picks for the board from the facts provisioning gathered (:func:`training_choice`).

``python -m fleet.board_packages --training torch`` prints a set, for building a wheelhouse.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from packaging.utils import canonicalize_name

from core.pins import PinsError, pin, project_pins

__all__ = [
    "PACKAGE_SOURCES",
    "RUNTIME",
    "TRAINING_BACKENDS",
    "TRAINING_CHOICES",
    "BoardPackagesError",
    "bare_requirements_file",
    "board_requirements",
    "constraints",
    "ort_training_supported",
    "project_pins",
    "requirements_file",
    "training_choice",
]

# The distributions the agent imports at run time (a test checks them against its imports).
RUNTIME = ("numpy", "onnxruntime", "httpx", "safetensors", "cryptography", "psutil", "websockets")
ORT_EXTRA = "board-ort"
ORT_TRAINING = "onnxruntime-training-cpu"
# Installed without their declared dependencies: the training build declares onnx, sympy,
# h5py and cerberus, which serve ORTModule and making training artifacts, neither of which
# a board does (the server builds the artifacts); without them the board carries 150 MB less.
WITHOUT_DEPS = frozenset({ORT_TRAINING})

TRAINING_CHOICES = ("none", "torch", "onnxruntime", "auto")
PACKAGE_SOURCES = ("index", "wheelhouse", "system")
# The agent's names for its training backends (agent.toml's training_backends).
TRAINING_BACKENDS = {"none": [], "torch": ["torch"], "onnxruntime": ["ort"]}
# onnxruntime-training-cpu 1.19.2 ships wheels for these only.
ORT_TRAINING_PYTHON = ((3, 10), (3, 12))


# The errors of reading the pins (kept under this name for provisioning's callers).
BoardPackagesError = PinsError


def board_requirements(training: str) -> list[str]:
    """The requirement lines a board installs for a training choice (not ``auto``)."""
    if training not in TRAINING_BACKENDS:
        raise ValueError(f"training must be one of {sorted(TRAINING_BACKENDS)}, got {training!r}")
    lines = [pin(name) for name in RUNTIME]
    if training == "torch":
        lines.append(pin("torch"))
    elif training == "onnxruntime":
        lines[RUNTIME.index("onnxruntime")] = pin(ORT_TRAINING, ORT_EXTRA)
    return lines


def constraints(training: str = "none") -> list[str]:
    """The server's other pins, as pip constraints for a board's install of `training`.

    A package the board set pulls in that the server also pins (onnx, for
    onnxruntime-training) gets the server's version. The set's own packages are left out:
    they are pinned already, and pip reports a constrained package it cannot find as a
    "conflict" instead of saying that it is missing.
    """
    required = {canonicalize_name(line.partition("==")[0]) for line in board_requirements(training)}
    return sorted(line for name, line in project_pins().items() if name not in required)


def _bare(line: str) -> bool:
    return canonicalize_name(line.partition("==")[0]) in WITHOUT_DEPS


def requirements_file(training: str) -> str:
    """The text of the requirement file uploaded to the board (installed with dependencies)."""
    header = f"# The Flotilla agent's packages (training: {training}), pinned as on the server.\n"
    return header + "".join(f"{line}\n" for line in board_requirements(training) if not _bare(line))


def bare_requirements_file(training: str) -> str:
    """The requirements installed without their dependencies (see :data:`WITHOUT_DEPS`), or ""."""
    lines = [line for line in board_requirements(training) if _bare(line)]
    if not lines:
        return ""
    header = "# Installed with --no-deps: their declared dependencies are not needed on a board.\n"
    return header + "".join(f"{line}\n" for line in lines)


def _python(facts: Mapping[str, Any]) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(facts.get("python", "")).split(".")[:2])
    except ValueError:
        return ()


def ort_training_supported(facts: Mapping[str, Any]) -> bool:
    """Whether onnxruntime-training-cpu has a wheel for the board: x86_64 Linux, Python ≤ 3.12."""
    low, high = ORT_TRAINING_PYTHON
    return (
        facts.get("os") == "Linux"
        and facts.get("arch") in ("x86_64", "amd64")
        and low <= _python(facts) <= high
    )


def training_choice(requested: str, *, facts: Mapping[str, Any], packages: str) -> tuple[str, str]:
    """The training set a board gets, and why, from the requested choice and the host facts.

    ``auto`` keeps PyTorch on a board that can already import it; otherwise it prefers the
    smaller ONNX Runtime training build where a wheel of it exists (x86_64 Linux, Python
    ≤ 3.12) and PyTorch everywhere else (ARM boards among them). With ``packages=system``
    nothing is installed, so ``auto`` takes what the board already has, or no training.
    """
    if requested != "auto":
        return requested, "requested"
    importable = facts.get("importable") or {}
    if importable.get("torch"):
        return "torch", f"the board imports torch {importable['torch']}"
    if packages == "system":
        if importable.get("onnxruntime") and facts.get("onnxruntime_training"):
            return "onnxruntime", "the board's onnxruntime is a training build"
        return "none", "the board has no training runtime and nothing is installed"
    if ort_training_supported(facts):
        return "onnxruntime", "no torch on the board; onnxruntime-training has a wheel for it"
    return "torch", f"no torch on the board; no onnxruntime-training wheel for {facts.get('arch')}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fleet.board_packages", description="Print the packages a board installs."
    )
    parser.add_argument("--training", choices=sorted(TRAINING_BACKENDS), default="none")
    parser.add_argument(
        "--constraints", action="store_true", help="print the constraints to install the set with"
    )
    args = parser.parse_args(argv)
    lines = constraints(args.training) if args.constraints else board_requirements(args.training)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
