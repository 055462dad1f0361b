"""The board's requirement sets: derived from the project's pins, and the training choice."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from fleet.board_packages import (
    RUNTIME,
    board_requirements,
    constraints,
    main,
    ort_training_supported,
    requirements_file,
    training_choice,
)

ROOT = Path(__file__).resolve().parents[3]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pinned_lines(lines: list[str]) -> dict[str, str]:
    """name → "name==version", extras dropped, from pyproject's own text."""
    pins = {}
    for line in lines:
        name, _, version = line.partition("==")
        name = name.split("[")[0]
        pins[name.lower()] = f"{name}=={version}"
    return pins


def test_the_installed_metadata_carries_pyprojects_pins() -> None:
    project = _pyproject()["project"]
    dependencies = _pinned_lines(project["dependencies"])
    ort = _pinned_lines(project["optional-dependencies"]["board-ort"])
    assert ort == {"onnxruntime-training-cpu": "onnxruntime-training-cpu==1.19.2"}
    # A stale editable install (pyproject changed since) would give the board old versions.
    every = sorted([*constraints(), *board_requirements("none")])
    assert every == sorted(dependencies.values()), "pins differ: run `make install`"
    assert "onnx==1.19.0" in constraints("onnxruntime") and "numpy==2.3.3" not in constraints("none")


def test_each_set_is_exactly_the_pinned_lines_of_pyproject() -> None:
    project = _pyproject()["project"]
    pins = _pinned_lines(project["dependencies"])
    ort = _pinned_lines(project["optional-dependencies"]["board-ort"])

    runtime = [pins[name] for name in RUNTIME]
    assert board_requirements("none") == runtime
    assert "numpy==2.3.3" in runtime and "onnxruntime==1.23.0" in runtime
    assert board_requirements("torch") == [*runtime, pins["torch"]]

    with_ort = board_requirements("onnxruntime")
    assert ort["onnxruntime-training-cpu"] in with_ort
    # Both distributions install the `onnxruntime` module: a board never gets the two.
    assert not [line for line in with_ort if line.startswith("onnxruntime==")]
    others = [line for line in runtime if not line.startswith("onnxruntime==")]
    assert sorted(with_ort) == sorted([*others, *ort.values()])
    for lines in (board_requirements("none"), board_requirements("torch"), with_ort):
        assert all(line.count("==") == 1 and "[" not in line for line in lines)
    assert "# " in requirements_file("torch") and requirements_file("torch").endswith(f"{pins['torch']}\n")

    with pytest.raises(ValueError, match="training must be one of"):
        board_requirements("auto")


def test_the_server_has_onnxruntime_not_its_training_build() -> None:
    # Installing the board-ort extra here would silently replace onnxruntime 1.23.0.
    assert importlib.metadata.version("onnxruntime") == "1.23.0"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("onnxruntime-training-cpu")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"__future__", "devices_agent"}


def test_the_runtime_set_holds_every_package_the_agent_imports() -> None:
    distributions = importlib.metadata.packages_distributions()
    needed: dict[str, set[str]] = {}
    for path in sorted((ROOT / "devices_agent").rglob("*.py")):
        for module in _imports(path):
            for distribution in distributions.get(module, [module]):
                needed.setdefault(distribution.lower(), set()).add(path.name)
    # scikit-learn serves the demo's digits data set, which runs on the server's simulator.
    assert needed.pop("scikit-learn") == {"data.py"}
    # torch is what the training set adds; everything else is needed to serve models.
    assert "torch_backend.py" in needed.pop("torch")
    assert set(needed) == set(RUNTIME), needed


def _facts(**overrides: Any) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "arch": "x86_64",
        "os": "Linux",
        "python": "3.11.2",
        "importable": {"numpy": None, "onnxruntime": None, "torch": None},
        "onnxruntime_training": False,
    }
    facts.update(overrides)
    return facts


def test_auto_picks_onnxruntime_training_where_its_wheels_exist_and_torch_elsewhere() -> None:
    def auto(**facts: Any) -> str:
        return training_choice("auto", facts=_facts(**facts), packages="index")[0]

    assert auto() == "onnxruntime"
    assert auto(python="3.12.7") == "onnxruntime"
    assert auto(python="3.13.1") == "torch", "no onnxruntime-training wheel for Python 3.13"
    assert auto(arch="aarch64") == "torch", "ARM boards stay on PyTorch"
    assert auto(arch="armv7l") == "torch"
    assert auto(os="Darwin") == "torch"
    with_torch = {"numpy": "2.3.3", "onnxruntime": None, "torch": "2.13.0+cpu"}
    assert auto(importable=with_torch) == "torch"
    assert auto(importable=with_torch, arch="aarch64") == "torch"
    choice, why = training_choice("auto", facts=_facts(importable=with_torch), packages="index")
    assert "torch 2.13.0+cpu" in why

    # Explicit choices are kept as they are, whatever the board.
    for requested in ("none", "torch", "onnxruntime"):
        assert training_choice(requested, facts=_facts(arch="aarch64"), packages="index")[0] == requested


def test_auto_with_the_boards_own_packages_takes_what_it_has() -> None:
    def auto(**facts: Any) -> str:
        return training_choice("auto", facts=_facts(**facts), packages="system")[0]

    assert auto() == "none", "packages=system installs nothing, so it cannot add a runtime"
    ort_build = {"numpy": "2.3.3", "onnxruntime": "1.19.2", "torch": None}
    assert auto(importable=ort_build, onnxruntime_training=True) == "onnxruntime"
    assert auto(importable={"numpy": "2.3.3", "onnxruntime": "1.23.0", "torch": "2.13.0"}) == "torch"


def test_onnxruntime_training_support_is_read_from_the_facts() -> None:
    assert ort_training_supported(_facts())
    assert ort_training_supported(_facts(python="3.10.12"))
    assert not ort_training_supported(_facts(python="3.13.0"))
    assert not ort_training_supported(_facts(arch="aarch64"))
    assert not ort_training_supported(_facts(python="garbage"))
    assert not ort_training_supported({})


def test_the_command_prints_a_set_for_building_a_wheelhouse(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--training", "torch"]) == 0
    assert capsys.readouterr().out.split() == board_requirements("torch")
    assert main(["--constraints", "--training", "torch"]) == 0
    assert capsys.readouterr().out.split() == constraints("torch")


def test_the_training_build_is_installed_without_its_declared_dependencies() -> None:
    """onnx, sympy, h5py and cerberus serve making artifacts, which boards never do."""
    from fleet.board_packages import bare_requirements_file, requirements_file

    with_deps = requirements_file("onnxruntime")
    bare = bare_requirements_file("onnxruntime")
    assert "onnxruntime-training-cpu==1.19.2" in bare and "onnxruntime-training" not in with_deps
    assert "numpy==" in with_deps and "onnxruntime==" not in with_deps
    assert bare_requirements_file("torch") == "" and bare_requirements_file("none") == ""
