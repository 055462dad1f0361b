"""A torch-less board on this machine: a virtualenv with only what such a board installs.

For tests, benchmarks and trying the agent by hand: ONNX Runtime's training build (the
``board-ort`` extra, which also serves inference, without its declared dependencies) and
the agent's runtime dependencies at the project's pins, in an environment created once
and cached between runs under ``$FLOTILLA_CACHE_DIR`` (default ``~/.cache/flotilla``),
named by those pins. The agent itself is installed per use from the same bundle
provisioning uploads to boards (:func:`fleet.services.provisioning.agent_bundle`), into a
directory of its own, so the cached environment never holds one checkout's agent code for
another.

Nothing of the project's own environment is visible there: no torch, no Django.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from fleet.board_packages import WITHOUT_DEPS
from fleet.board_packages import board_requirements as board_set
from models_registry.ml.ort_env import Log, ensure_venv, env_dir

__all__ = [
    "board_environ",
    "board_python",
    "board_requirements",
    "cache_root",
    "install_agent",
]


def cache_root() -> Path:
    """Where environments shared between runs live."""
    return Path(os.environ.get("FLOTILLA_CACHE_DIR") or Path.home() / ".cache" / "flotilla")


def board_requirements() -> tuple[list[str], list[str]]:
    """A torch-less board's packages, as provisioning installs them (``training=onnxruntime``).

    ``(with their dependencies, without them)``: the training build is installed bare
    (:data:`fleet.board_packages.WITHOUT_DEPS`), so the board carries ONNX Runtime and
    numpy and nothing else of the kind.
    """
    lines = board_set("onnxruntime")
    bare = [line for line in lines if line.partition("==")[0] in WITHOUT_DEPS]
    return [line for line in lines if line not in bare], bare


def board_python(root: Path | None = None, *, log: Log | None = None) -> Path:
    """The Python of the cached torch-less board environment (created on first use)."""
    requirements, bare = board_requirements()
    folder = env_dir((root or cache_root()) / "board-ort", requirements + bare)
    return ensure_venv(folder, requirements, without_deps=bare, log=log)


def install_agent(python: Path, target: Path) -> Path:
    """Install the agent bundle with ``python``'s pip into ``target``; returns ``target``.

    Offline and without dependencies, as provisioning installs it on a board.
    """
    from fleet.services.provisioning import BUNDLE_NAME, agent_bundle

    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flotilla-bundle-") as scratch:
        bundle = Path(scratch) / BUNDLE_NAME
        bundle.write_bytes(agent_bundle())
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-index",
                "--no-deps",
                "--target",
                str(target),
                str(bundle),
            ],
            check=True,
            capture_output=True,
            cwd=scratch,
        )
    return target


def board_environ(agent_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a board process: the installed agent on its path, nothing else."""
    env = {k: v for k, v in (base if base is not None else os.environ).items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(agent_dir)
    env["PYTHONNOUSERSITE"] = "1"
    return env
