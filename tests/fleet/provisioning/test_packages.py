"""The agent's packages on a real board over SSH: pinned installs, failures, the selftest.

Jobs run in this process against the real sshd (the board is this machine, reached over
loopback); the server URL they give the agent has no server behind it, so each job ends
waiting for an enrollment that the end-to-end test covers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.provisioning.conftest import LOCAL_WHEELS, Board, cached_wheelhouse, make_board_python

pytestmark = pytest.mark.django_db

# Nothing listens on the discard port: the started agent keeps retrying its enrollment.
NO_SERVER = "http://127.0.0.1:9"


def _provision(board: Board, install_dir: Path, **options: Any) -> Any:
    from fleet.models import ProvisioningJob
    from fleet.services.provisioning import provisioning_job_create, provisioning_job_run

    job = provisioning_job_create(
        actor=None,
        host=board.host,
        port=board.port,
        username=board.username,
        private_key=board.private_key,
        install_dir=str(install_dir),
        server_url=NO_SERVER,
        enrollment_timeout_s=60,
        **options,
    )
    for _ in range(5):
        if provisioning_job_run(job_id=job.pk) is None:
            break
        if ProvisioningJob.objects.get(pk=job.pk).status == ProvisioningJob.Status.WAITING_ENROLLMENT:
            break
    return ProvisioningJob.objects.get(pk=job.pk)


def _versions(python: Path, names: list[str]) -> dict[str, str | None]:
    """The installed version of each distribution, as the board's venv itself reports it."""
    script = (
        "import importlib.metadata as m, json, sys\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({n: v(n) for n in sys.argv[1:]}))"
    )
    done = subprocess.run([str(python), "-c", script, *names], capture_output=True, text=True, check=True)
    versions: dict[str, str | None] = json.loads(done.stdout)
    return versions


def _pins(lines: list[str]) -> dict[str, str]:
    return dict(line.split("==") for line in lines)


def _progress(job: Any) -> str:
    return "\n".join(s["message"] for s in job.steps if s["step"] == "packages")


def _explain(job: Any) -> str:
    return f"{job.status} {job.error_code}: {job.error}\n" + "\n".join(
        f"{s['step']:12} {s['status']:8} {s['message']}" for s in job.steps
    )


@pytest.fixture
def install_dir(board: Board, request: pytest.FixtureRequest) -> Iterator[Path]:
    path = board.install_dir(request.node.name)
    yield path
    pidfile = path / "agent.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


def _assert_nothing_enrolled(job: Any, install_dir: Path) -> None:
    from fleet.models import Device, EnrollmentToken

    assert job.credential_encrypted == ""
    assert job.attempts == 1, "a failure on the board is not retried"
    assert job.enrollment_token is None and not EnrollmentToken.objects.exists()
    assert not Device.objects.exists()
    assert not (install_dir / "agent.toml").exists(), "no token was written to the board"
    assert not (install_dir / "agent.pid").exists(), "no agent was started"


@pytest.mark.slow
def test_a_bare_board_gets_the_pinned_packages_from_the_uploaded_wheelhouse(
    accepted_board: Board, bare_python: str, runtime_wheelhouse: Path, settings: Any, install_dir: Path
) -> None:
    from fleet.board_packages import RUNTIME, board_requirements

    settings.PROVISIONING_WHEELHOUSE = str(runtime_wheelhouse)
    job = _provision(accepted_board, install_dir, python=bare_python, packages="wheelhouse")
    assert job.status == "waiting_enrollment", _explain(job)

    facts = job.host_facts
    assert facts["importable"] == {"numpy": None, "onnxruntime": None, "torch": None}
    assert (facts["packages"], facts["training"]) == ("wheelhouse", "none")
    assert facts["requirements"] == board_requirements("none")

    # The venv has its own packages, at exactly the server's pins, and no torch.
    venv_python = install_dir / "venv" / "bin" / "python"
    installed = _versions(venv_python, [*RUNTIME, "torch", "onnxruntime-training-cpu"])
    assert installed == {**_pins(board_requirements("none")), "torch": None, "onnxruntime-training-cpu": None}
    assert installed["numpy"] == "2.3.3" and installed["onnxruntime"] == "1.23.0"
    assert (install_dir / "requirements.txt").read_text().split("\n")[1:-1] == board_requirements("none")
    assert sorted(p.name for p in (install_dir / "wheelhouse").iterdir()) == sorted(
        p.name for p in runtime_wheelhouse.glob("*.whl")
    )

    # pip's progress is in the step log, as the dashboard shows it.
    progress = _progress(job)
    assert "numpy==2.3.3" in progress and "onnxruntime==1.23.0" in progress
    assert "Successfully installed" in progress and "numpy-2.3.3" in progress

    # The selftest ran a real inference in the venv, and its report is kept.
    report = facts["selftest"]
    assert report["ok"] and report["inference"]["ok"] and "training" not in report
    assert (report["numpy"], report["onnxruntime"], report["torch"]) == ("2.3.3", "1.23.0", None)
    assert [s["status"] for s in job.steps if s["step"] == "selftest"] == ["started", "ok"]

    config = tomllib.loads((install_dir / "agent.toml").read_text())
    assert config["train"] is False and "training_backends" not in config
    os.kill(int((install_dir / "agent.pid").read_text()), 0)  # the agent runs

    # Provisioning again finds the wheels and the packages in place.
    again = _provision(accepted_board, install_dir, python=bare_python, packages="wheelhouse")
    assert again.status == "waiting_enrollment", _explain(again)
    assert "0 sent (0 MB)" in " ".join(s["message"] for s in again.steps if s["step"] == "upload")
    assert "Successfully installed" not in _progress(again)
    assert "Requirement already satisfied: numpy==2.3.3" in _progress(again)


@pytest.mark.slow
def test_training_with_torch_installs_the_pinned_torch_and_proves_a_training_step(
    accepted_board: Board, bare_python: str, settings: Any, install_dir: Path
) -> None:
    from fleet.board_packages import board_requirements

    torch_pin = _pins(board_requirements("torch"))["torch"]
    wheels = sorted(LOCAL_WHEELS.glob(f"torch-{torch_pin}+cpu-*.whl"))
    if not wheels:
        pytest.fail(
            f"No CPU build of torch {torch_pin} in {LOCAL_WHEELS}: from the index, torch=={torch_pin} on "
            f"Linux is a multi-GB CUDA build. Put torch-{torch_pin}+cpu-<tags>.whl in {LOCAL_WHEELS}."
        )
    # From the package index, with the local CPU build found next to it (pip prefers
    # 2.x+cpu, a local version label, to the index's 2.x of the same release).
    settings.PROVISIONING_PIP_FIND_LINKS = [str(LOCAL_WHEELS)]
    job = _provision(accepted_board, install_dir, python=bare_python, packages="index", training="torch")
    assert job.status == "waiting_enrollment", _explain(job)
    assert job.host_facts["training"] == "torch"
    assert f"torch=={torch_pin}" in _progress(job)

    installed = _versions(install_dir / "venv" / "bin" / "python", ["torch", "numpy", "onnxruntime"])
    assert installed == {"torch": f"{torch_pin}+cpu", "numpy": "2.3.3", "onnxruntime": "1.23.0"}

    report = job.host_facts["selftest"]
    assert report["ok"] and report["inference"]["ok"], report
    assert report["training"] == {"ok": True, "backends": {"torch": {"ok": True, "steps": 1.0}}}
    config = tomllib.loads((install_dir / "agent.toml").read_text())
    assert config["train"] is True and config["training_backends"] == ["torch"]


@pytest.mark.slow
def test_training_with_onnxruntime_swaps_in_its_training_build_from_a_wheelhouse_on_the_board(
    accepted_board: Board, bare_python: str, install_dir: Path
) -> None:
    from fleet.board_packages import board_requirements

    # The board is this machine, so the cache is also a directory on the board: used
    # where it is, nothing uploaded.
    wheelhouse = cached_wheelhouse("onnxruntime")
    job = _provision(
        accepted_board,
        install_dir,
        python=bare_python,
        packages="wheelhouse",
        wheelhouse=str(wheelhouse),
        training="auto",
    )
    assert job.status == "waiting_enrollment", _explain(job)
    assert job.host_facts["training"] == "onnxruntime", "a torch-less x86_64 board with Python 3.11"
    assert not (install_dir / "wheelhouse").exists()

    installed = _versions(
        install_dir / "venv" / "bin" / "python", ["onnxruntime-training-cpu", "onnxruntime", "onnx", "numpy"]
    )
    ort_pin = _pins(board_requirements("onnxruntime"))["onnxruntime-training-cpu"]
    # Never both: the training build alone provides the onnxruntime module, installed
    # without its declared dependencies (onnx serves building artifacts, which the server does).
    assert installed == {
        "onnxruntime-training-cpu": ort_pin,
        "onnxruntime": None,
        "onnx": None,
        "numpy": "2.3.3",
    }
    report = job.host_facts["selftest"]
    assert report["ok"] and report["inference"]["ok"] and report["onnxruntime"] == ort_pin
    assert report["training"]["ok"] and set(report["training"]["backends"]) == {"ort"}
    assert f"onnxruntime {ort_pin}" in [s["message"] for s in job.steps if s["step"] == "selftest"][-1]
    config = tomllib.loads((install_dir / "agent.toml").read_text())
    assert config["train"] is True and config["training_backends"] == ["ort"]


@pytest.mark.slow
def test_a_wheelhouse_without_the_packages_fails_the_job_with_pips_reason(
    accepted_board: Board, bare_python: str, settings: Any, install_dir: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "wheelhouse"
    empty.mkdir()
    settings.PROVISIONING_WHEELHOUSE = str(empty)
    job = _provision(accepted_board, install_dir, python=bare_python, packages="wheelhouse")
    assert job.status == "failed", _explain(job)
    assert job.error_code == "packages_failed"
    said = f"pip could not install the agent's packages from the wheelhouse {install_dir}/wheelhouse"
    assert job.error.startswith(said)
    assert "No matching distribution found for numpy==2.3.3" in job.error
    _assert_nothing_enrolled(job, install_dir)


@pytest.mark.slow
def test_a_board_python_without_the_packages_is_refused_when_nothing_is_installed(
    accepted_board: Board, bare_python: str, install_dir: Path
) -> None:
    job = _provision(accepted_board, install_dir, python=bare_python, packages="system")
    assert job.status == "failed", _explain(job)
    assert job.error_code == "packages_missing"
    # Whatever the interpreter it was made from has is seen (that is what system means),
    # but nothing there provides onnxruntime.
    missing = job.error.split("missing on the board: ")[1].split(", ")
    assert "onnxruntime==1.23.0" in missing and "httpx==0.28.1" in missing
    _assert_nothing_enrolled(job, install_dir)


@pytest.fixture(scope="session")
def packaged_python(tmp_path_factory: pytest.TempPathFactory, runtime_wheelhouse: Path) -> Path:
    """A board Python (a venv) that has every package of the agent, from the wheelhouse."""
    from fleet.board_packages import board_requirements, constraints

    root = tmp_path_factory.mktemp("packaged-python")
    make_board_python(root / "venv")
    (root / "requirements.txt").write_text("\n".join(board_requirements("none")))
    (root / "constraints.txt").write_text("\n".join(constraints("none")))
    subprocess.run(
        [
            str(root / "venv" / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ]
        + ["--no-index", "--find-links", str(runtime_wheelhouse)]
        + ["-r", str(root / "requirements.txt"), "-c", str(root / "constraints.txt")],
        check=True,
        timeout=600,
    )
    return root / "venv"


# Two ways a native library is found damaged on a board: empty (the loader refuses it, an
# ImportError the selftest reports) and cut short (mapped, then read past its end: the
# interpreter dies of SIGBUS before it can report anything), as an interrupted copy or a
# failing SD card leaves it.
DAMAGE = {"empty": 0, "cut_short": 4096}


@pytest.mark.slow
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_board_whose_onnxruntime_cannot_load_fails_its_selftest(
    accepted_board: Board, packaged_python: Path, install_dir: Path, tmp_path: Path, damage: str
) -> None:
    board_venv = tmp_path / "venv"
    shutil.copytree(packaged_python, board_venv, symlinks=True)
    (library,) = board_venv.glob("lib/python*/site-packages/onnxruntime/capi/onnxruntime_pybind11_state*.so")
    with library.open("r+b") as handle:
        handle.truncate(DAMAGE[damage])

    job = _provision(
        accepted_board, install_dir, python=str(board_venv / "bin" / "python"), packages="system"
    )
    assert job.status == "failed", _explain(job)
    assert job.error_code == "selftest_failed"
    # Every package is there; only loading and running a model shows the damage.
    assert "found onnxruntime 1.23.0" in _progress(job)
    assert job.host_facts["import_errors"]["onnxruntime"]
    if damage == "empty":
        assert job.error.startswith("The agent's selftest failed on the board (exit 1): inference FAILED")
        assert "ImportError" in job.error and "onnxruntime_pybind11_state" in job.error
        report = job.host_facts["selftest"]
        assert report["ok"] is False and report["inference"]["ok"] is False
        assert report["onnxruntime"] == "1.23.0"
    else:
        assert job.host_facts["import_errors"]["onnxruntime"] == "killed by SIGBUS"
        assert job.error.startswith("The agent's selftest failed on the board (killed by SIGBUS): no report")
        assert "the selftest was killed by signal 7" in job.error
        assert "selftest" not in job.host_facts
    _assert_nothing_enrolled(job, install_dir)
