"""Virtual environments with ONNX Runtime's training build, apart from the server's own.

``onnxruntime-training-cpu`` installs its own ``onnxruntime`` module: put into the
server's environment it silently replaces the onnxruntime release the server serves and
checks models with. So it only ever lives in environments of its own:

- the **builder** (:func:`builder_python`): the training build plus the ``onnx`` release
  its artifact generator works with (the optimizer graph made with a newer onnx is refused
  by the 1.19 runtime) and numpy, all at the pins of ``pyproject.toml`` (the
  ``ort-builder`` extra; numpy at the project's pin). The server runs
  :mod:`models_registry.ml.ort_builder` in it as a subprocess;
- a **torch-less board** (``config.board_env``): the training build (the ``board-ort``
  extra) and the agent's runtime dependencies.

An environment is created once under a directory named by its pins and Python version
and reused while they stay the same; creation holds a file lock, so concurrent workers
(and concurrent test runs) build it once. Pins come from :mod:`core.pins`.

    python -m models_registry.ml.ort_env /opt/ort-builder   # the builder, at a fixed place
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from core.pins import pin, project_pins

__all__ = [
    "BUILDER_SCRIPT",
    "build_artifacts",
    "builder_python",
    "builder_requirements",
    "ensure_venv",
    "extra_requirements",
    "pinned",
]

BUILDER_SCRIPT = Path(__file__).resolve().parent / "ort_builder.py"
BUILDER_EXTRA = "ort-builder"
MARKER = ".flotilla-env.json"

Log = Callable[[str], None]


def pinned(*names: str) -> list[str]:
    """The project's own pins of ``names`` (e.g. ``numpy==2.3.3``)."""
    return [pin(name) for name in names]


def extra_requirements(extra: str) -> list[str]:
    """The requirements of the project's optional extra ``extra``."""
    return list(project_pins(extra).values())


def builder_requirements() -> list[str]:
    """What the builder environment holds: the ``ort-builder`` extra and numpy at the project's pin."""
    return [*extra_requirements(BUILDER_EXTRA), *pinned("numpy")]


def env_dir(root: Path, requirements: list[str]) -> Path:
    """Where an environment of ``requirements`` lives under ``root``: named by them and Python."""
    key = hashlib.sha256(json.dumps(sorted(requirements) + ["v2"]).encode()).hexdigest()[:12]
    return root / f"py{sys.version_info.major}{sys.version_info.minor}-{key}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _python_of(folder: Path) -> Path:
    return folder / "bin" / "python"


def ensure_venv(
    folder: Path,
    requirements: list[str],
    *,
    without_deps: list[str] | None = None,
    log: Log | None = None,
    timeout_s: float = 1800,
) -> Path:
    """The Python of a virtualenv at ``folder`` holding exactly ``requirements``, created if needed.

    ``without_deps`` are installed after the others and without their declared
    dependencies. A finished environment carries a marker with its requirements; one
    without it (an interrupted creation) or with other requirements is made again.
    """
    folder = Path(folder)
    marker = folder / MARKER
    bare = list(without_deps or [])
    wanted = {
        "requirements": sorted(requirements),
        "without_deps": sorted(bare),
        "python": list(sys.version_info[:2]),
    }

    def ready() -> bool:
        try:
            return bool(json.loads(marker.read_text()) == wanted) and _python_of(folder).exists()
        except (OSError, ValueError):
            return False

    if ready():
        return _python_of(folder)
    with _locked(folder.with_name(folder.name + ".lock")):
        if ready():
            return _python_of(folder)
        if folder.exists():
            shutil.rmtree(folder)
        if log:
            log(f"creating the environment {folder} with {' '.join(requirements)}")
        base = getattr(sys, "_base_executable", sys.executable) or sys.executable
        subprocess.run([base, "-m", "venv", str(folder)], check=True, timeout=timeout_s)
        pip = [str(_python_of(folder)), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        try:
            for command in ([*pip, *requirements], [*pip, "--no-deps", *bare] if bare else None):
                if command:
                    subprocess.run(command, check=True, timeout=timeout_s, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            tail = "\n".join((exc.stderr or exc.stdout or "").strip().splitlines()[-10:])
            raise RuntimeError(f"pip could not install {requirements + bare}: {tail}") from None
        marker.write_text(json.dumps(wanted))
    return _python_of(folder)


def builder_python(root: Path, *, log: Log | None = None) -> Path:
    """The builder environment's Python under ``root`` (created on first use)."""
    requirements = builder_requirements()
    return ensure_venv(env_dir(Path(root), requirements), requirements, log=log)


def build_artifacts(
    *,
    python: Path,
    onnx: bytes,
    out: Path,
    task: str,
    trainable: list[str],
    input_shape: list[int],
    input_dtype: str,
    outputs: int,
    timeout_s: float = 900,
) -> dict[str, Any]:
    """Run the builder on an ONNX graph; the graphs land in ``out``; its answer: ``ok``, and
    ``manifest``, or ``code``, ``reason`` and (for a missing gradient) ``op`` and ``node``.

    Raises ``RuntimeError`` when the builder itself fails (not when the graph cannot be
    trained: that is an answer with ``ok`` false).
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flotilla-ort-build-") as scratch:
        model = Path(scratch) / "model.onnx"
        model.write_bytes(onnx)
        command = [
            str(python),
            "-I",
            str(BUILDER_SCRIPT),
            "build",
            "--onnx",
            str(model),
            "--out",
            str(out),
            "--task",
            task,
            "--trainable",
            ",".join(trainable),
            "--input-shape",
            ",".join(str(int(d)) for d in input_shape),
            "--dtype",
            input_dtype,
            "--outputs",
            str(int(outputs)),
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=scratch)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the ORT artifact builder took longer than {timeout_s:g} s") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = "\n".join(done.stderr.strip().splitlines()[-10:])
        raise RuntimeError(f"the ORT artifact builder failed (exit {done.returncode}): {tail}")
    answer: dict[str, Any] = json.loads(lines[-1])
    return answer


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m models_registry.ml.ort_env DIR", file=sys.stderr)
        return 2
    print(ensure_venv(Path(args[0]), builder_requirements(), log=print))
    return 0


if __name__ == "__main__":
    sys.exit(main())
