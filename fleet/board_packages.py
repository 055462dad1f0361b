"""What a board installs: the agent's dependencies, at the versions the server is pinned to.

Every pin lives in ``pyproject.toml``; this module reads them from the installed
``flotilla`` distribution's metadata (``importlib.metadata.requires``), which exists in a
wheel install and an editable one alike (the Docker image installs with ``pip install -e .``),
so a board gets exactly the versions the server runs and was tested with.

- The *runtime* set is what the agent imports when it serves models (:data:`RUNTIME`).
- Training adds ``torch`` (choice ``torch``), or swaps ``onnxruntime`` for
  ``onnxruntime-training-cpu`` from the ``board-ort`` extra (choice ``onnxruntime``): both
  distributions provide the ``onnxruntime`` module, so a board never gets the two.
- ``auto`` picks for the board from the facts provisioning gathered (:func:`training_choice`).

``python -m fleet.board_packages --training torch`` prints a set, for building a wheelhouse.
"""

from __future__ import annotations

import argparse
import importlib.metadata
from collections.abc import Mapping
from functools import cache
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

__all__ = [
    "PACKAGE_SOURCES",
    "RUNTIME",
    "TRAINING_BACKENDS",
    "TRAINING_CHOICES",
    "BoardPackagesError",
    "board_requirements",
    "constraints",
    "ort_training_supported",
    "project_pins",
    "requirements_file",
    "training_choice",
]

PROJECT = "flotilla"
# The distributions the agent imports at run time (a test checks them against its imports).
RUNTIME = ("numpy", "onnxruntime", "httpx", "safetensors", "cryptography", "psutil", "websockets")
ORT_EXTRA = "board-ort"
ORT_TRAINING = "onnxruntime-training-cpu"

TRAINING_CHOICES = ("none", "torch", "onnxruntime", "auto")
PACKAGE_SOURCES = ("index", "wheelhouse", "system")
# The agent's names for its training backends (agent.toml's training_backends).
TRAINING_BACKENDS = {"none": [], "torch": ["torch"], "onnxruntime": ["ort"]}
# onnxruntime-training-cpu 1.19.2 ships wheels for these only.
ORT_TRAINING_PYTHON = ((3, 10), (3, 12))


class BoardPackagesError(Exception):
    """The pins cannot be read, or one of them is not an exact ``==`` version."""


def _requirements() -> list[Requirement]:
    try:
        lines = importlib.metadata.requires(PROJECT)
    except importlib.metadata.PackageNotFoundError as exc:
        raise BoardPackagesError(
            f"The {PROJECT} distribution is not installed, so its pins cannot be read "
            "(install it with `pip install -e .` or `make install`)."
        ) from exc
    return [Requirement(line) for line in lines or []]


def _line(requirement: Requirement) -> str:
    specifiers = list(requirement.specifier)
    if len(specifiers) != 1 or specifiers[0].operator != "==" or "*" in specifiers[0].version:
        raise BoardPackagesError(f"{requirement} is not pinned to one exact version in pyproject.toml.")
    # Without extras: no board package needs one, and pip refuses extras in constraints.
    return f"{requirement.name}=={specifiers[0].version}"


@cache
def project_pins(extra: str | None = None) -> dict[str, str]:
    """Canonical name → ``name==version`` of the project's dependencies (or of one extra)."""
    pins: dict[str, str] = {}
    for requirement in _requirements():
        marker = requirement.marker
        if extra is None:
            wanted = marker is None or marker.evaluate({"extra": ""})
        else:
            wanted = marker is not None and marker.evaluate({"extra": extra})
        if wanted:
            pins[canonicalize_name(requirement.name)] = _line(requirement)
    return pins


def _pin(name: str, extra: str | None = None) -> str:
    pins = project_pins(extra)
    key = canonicalize_name(name)
    if key not in pins:
        where = f"the {extra!r} extra" if extra else "[project] dependencies"
        raise BoardPackagesError(f"{name} is not pinned in {where} of pyproject.toml.")
    return pins[key]


def board_requirements(training: str) -> list[str]:
    """The requirement lines a board installs for a training choice (not ``auto``)."""
    if training not in TRAINING_BACKENDS:
        raise ValueError(f"training must be one of {sorted(TRAINING_BACKENDS)}, got {training!r}")
    lines = [_pin(name) for name in RUNTIME]
    if training == "torch":
        lines.append(_pin("torch"))
    elif training == "onnxruntime":
        lines[RUNTIME.index("onnxruntime")] = _pin(ORT_TRAINING, ORT_EXTRA)
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


def requirements_file(training: str) -> str:
    """The text of the requirement file uploaded to the board."""
    header = f"# The Flotilla agent's packages (training: {training}), pinned as on the server.\n"
    return header + "".join(f"{line}\n" for line in board_requirements(training))


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
