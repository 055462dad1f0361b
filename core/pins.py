"""The project's pinned versions, read from the installed ``flotilla`` distribution.

Every pin lives in ``pyproject.toml``. Code that installs something elsewhere (a board's
packages, the ONNX Runtime builder's environment) reads them here, from the distribution's
metadata (``importlib.metadata.requires``), which a wheel install and an editable one
(the Docker image installs with ``pip install -e .``) both have: what goes elsewhere is
exactly what the server runs and was tested with.
"""

from __future__ import annotations

import importlib.metadata
from functools import cache

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

__all__ = ["PinsError", "pin", "project_pins"]

PROJECT = "flotilla"


class PinsError(Exception):
    """The pins cannot be read, or one of them is not an exact ``==`` version."""


def _requirements() -> list[Requirement]:
    try:
        lines = importlib.metadata.requires(PROJECT)
    except importlib.metadata.PackageNotFoundError as exc:
        raise PinsError(
            f"The {PROJECT} distribution is not installed, so its pins cannot be read "
            "(install it with `pip install -e .` or `make install`)."
        ) from exc
    return [Requirement(line) for line in lines or []]


def _line(requirement: Requirement) -> str:
    specifiers = list(requirement.specifier)
    if len(specifiers) != 1 or specifiers[0].operator != "==" or "*" in specifiers[0].version:
        raise PinsError(f"{requirement} is not pinned to one exact version in pyproject.toml.")
    # Without extras: nothing installed elsewhere needs one, and pip refuses them in constraints.
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
    if extra is not None and not pins:
        raise PinsError(f"pyproject.toml has no extra {extra!r} (or it is empty).")
    return pins


def pin(name: str, extra: str | None = None) -> str:
    """``name==version`` as pinned in the dependencies (or in ``extra``)."""
    pins = project_pins(extra)
    key = canonicalize_name(name)
    if key not in pins:
        where = f"the {extra!r} extra" if extra else "[project] dependencies"
        raise PinsError(f"{name} is not pinned in {where} of pyproject.toml.")
    return pins[key]
