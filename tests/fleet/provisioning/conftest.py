"""A real OpenSSH server on loopback, playing the board that provisioning installs the agent on."""

from __future__ import annotations

import getpass
import hashlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SSHD = "/usr/sbin/sshd"


@dataclass
class Board:
    """The sshd under test and the credentials that open it."""

    host: str
    port: int
    username: str
    private_key: str  # in authorized_keys
    other_private_key: str  # not in authorized_keys
    host_key_type: str
    host_key_b64: str
    host_key_fingerprint: str  # as `ssh-keygen -lf` prints it
    other_host_key_b64: str  # a different key of the same type, for "changed key" tests
    root: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def install_dir(self, name: str) -> Path:
        """A fresh directory on "the board" for one job's installation."""
        path = self.root / "installs" / name
        assert not path.exists()
        return path


def _keygen(path: Path) -> tuple[str, str]:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    key_type, key_b64 = path.with_suffix(".pub").read_text().split()[:2]
    return key_type, key_b64


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_banner(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {log_path.read_text(errors='replace')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("sshd did not come up")


def _kill_agents(root: Path) -> None:
    """Stop every agent that provisioning started on the board during the session."""
    for pidfile in root.glob("installs/*/agent.pid"):
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture(autouse=True)
def _project_urls(settings: Any) -> None:
    # The parent conftest narrows the URLconf for its own tests; provisioning is tested
    # through the project's real one.
    settings.ROOT_URLCONF = "config.urls"


@pytest.fixture(scope="session")
def board(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Board]:
    """sshd -D on 127.0.0.1:<free port> with a fresh host key, key authentication only."""
    if not os.path.exists(SSHD):
        pytest.fail("openssh-server is missing: run `bash scripts/system-deps.sh`.")
    root = tmp_path_factory.mktemp("board")
    key_type, key_b64 = _keygen(root / "ssh_host_ed25519_key")
    _, other_b64 = _keygen(root / "other_host_ed25519_key")
    _keygen(root / "client_key")
    _keygen(root / "stranger_key")
    authorized = root / "authorized_keys"
    authorized.write_text((root / "client_key.pub").read_text())
    authorized.chmod(0o600)
    fingerprint = subprocess.run(
        ["ssh-keygen", "-l", "-E", "sha256", "-f", str(root / "ssh_host_ed25519_key.pub")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[1]

    port = _free_port()
    user = getpass.getuser()
    config = root / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {root / 'ssh_host_ed25519_key'}",
                f"AuthorizedKeysFile {authorized}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                f"PidFile {root / 'sshd.pid'}",
                f"AllowUsers {user}",
                "Subsystem sftp internal-sftp",
                "LogLevel VERBOSE",
                "",
            ]
        )
    )
    # sshd's privilege-separation directory.
    Path("/run/sshd").mkdir(mode=0o755, parents=True, exist_ok=True)
    log_path = root / "sshd.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    try:
        _wait_for_banner(port, process, log_path)
        yield Board(
            host="127.0.0.1",
            port=port,
            username=user,
            private_key=(root / "client_key").read_text(),
            other_private_key=(root / "stranger_key").read_text(),
            host_key_type=key_type,
            host_key_b64=key_b64,
            host_key_fingerprint=fingerprint,
            other_host_key_b64=other_b64,
            root=root,
            log_path=log_path,
        )
    finally:
        _kill_agents(root)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def accepted_board(board: Board, db: Any) -> Board:
    """The board's real host key, already accepted."""
    from fleet.models import KnownHost

    KnownHost.objects.get_or_create(
        host=board.host,
        port=board.port,
        key_type=board.host_key_type,
        defaults={"key_b64": board.host_key_b64, "fingerprint": board.host_key_fingerprint},
    )
    return board


# --- the board's Python and its packages --------------------------------------------------

# Downloaded wheels outlive a test run (and a fresh clone in CI): each set of pins is
# fetched once, then provisioning tests install from disk.
CACHE_DIR = Path(os.environ.get("FLOTILLA_CACHE_DIR") or Path.home() / ".cache" / "flotilla")
# A CPU build of torch lies here on some machines (see the Makefile); from the index,
# torch==<pin> on Linux is a multi-GB CUDA build.
LOCAL_WHEELS = Path("/opt/wheels")


def cached_wheelhouse(training: str) -> Path:
    """A wheelhouse with the board packages of `training` for this interpreter, built once.

    `pip download` with the server's pins as constraints resolves exactly what a board of
    this platform installs from it; the directory is named after its inputs, so new pins
    get a new wheelhouse.
    """
    from fleet.board_packages import board_requirements, constraints

    requirements, pins = board_requirements(training), constraints(training)
    key = hashlib.sha256(
        "\n".join([*requirements, *pins, sys.version, platform.machine()]).encode()
    ).hexdigest()[:16]
    target = CACHE_DIR / "wheelhouses" / f"{training}-{key}"
    if (target / ".complete").exists():
        return target
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    (building / "requirements.in").write_text("\n".join(requirements) + "\n")
    (building / "constraints.in").write_text("\n".join(pins) + "\n")
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "-d",
        str(building),
        "-r",
        str(building / "requirements.in"),
        "-c",
        str(building / "constraints.in"),
    ]
    if LOCAL_WHEELS.is_dir():
        command += ["--find-links", str(LOCAL_WHEELS)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        pytest.fail(f"could not build the {training} wheelhouse with pip download:\n{done.stderr[-3000:]}")
    for made in ("requirements.in", "constraints.in"):
        (building / made).unlink()
    (building / ".complete").touch()
    # Wheelhouses of earlier pins are of no further use.
    for stale in target.parent.glob(f"{training}-*"):
        if stale != building:
            shutil.rmtree(stale, ignore_errors=True)
    building.rename(target)
    return target


def base_python() -> str:
    """The interpreter this test run's virtualenv was made from."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}")


def make_board_python(path: Path) -> str:
    """A fresh virtualenv: a board Python that has nothing but pip."""
    subprocess.run([base_python(), "-m", "venv", str(path)], check=True, timeout=120)
    return str(path / "bin" / "python")


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A board Python without numpy, onnxruntime or any other package of the agent."""
    return make_board_python(tmp_path_factory.mktemp("bare-python") / "venv")


@pytest.fixture(scope="session")
def runtime_wheelhouse() -> Path:
    return cached_wheelhouse("none")
