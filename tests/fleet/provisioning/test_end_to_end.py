"""The whole flow through real processes: API → Celery worker → SSH → agent → enrollment."""

from __future__ import annotations

import os
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fleet.provisioning.conftest import Board

pytestmark = pytest.mark.slow


def _client(role: str) -> Any:
    from django.contrib.auth.models import Group, User
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    # get_or_create: a transactional test before this one may have flushed the role groups.
    user = User.objects.create_user(username=f"e2e-{role}", password="pw-Flotilla-1")
    user.groups.add(Group.objects.get_or_create(name=role)[0])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def _wait_for(
    predicate: Callable[[], Any], *, timeout: float, what: str, diagnostics: Callable[[], str]
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}\n{diagnostics()}")


@pytest.fixture
def install_dir(board: Board) -> Iterator[Path]:
    path = board.install_dir("end-to-end")
    yield path
    pidfile = path / "agent.pid"
    if pidfile.exists():
        try:
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        except (ProcessLookupError, ValueError):
            pass


def test_board_is_provisioned_and_its_agent_enrolls(
    board: Board, live_stack: Any, transactional_db: Any, install_dir: Path
) -> None:
    from fleet.models import Device, ProvisioningJob

    operator, admin = _client("operator"), _client("admin")

    def diagnostics() -> str:
        job = ProvisioningJob.objects.filter().order_by("-id").first()
        agent_logs = "".join(
            f"\n--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in install_dir.rglob("agent.log")
        )
        return (
            f"job: {job and job.status} {job and job.error}\nsteps: {job and job.steps}\n"
            f"worker log:\n{live_stack.log('worker')[-4000:]}{agent_logs}"
        )

    response = operator.post(
        "/api/v1/provisioning-jobs/",
        {
            "host": board.host,
            "port": board.port,
            "username": board.username,
            "private_key": board.private_key,
            # The board's Python is this test run's interpreter: its packages are the
            # agent's dependencies, already there as on a board with a prepared image;
            # it imports torch, so training=auto trains with it.
            "python": sys.executable,
            "packages": "system",
            "training": "auto",
            "install_dir": str(install_dir),
            "server_url": live_stack.url,
            "name": "provisioned-board",
            "tags": ["provisioned"],
            "enrollment_timeout_s": 120,
        },
        format="json",
    )
    assert response.status_code == 201, response.content
    job_id = response.json()["id"]

    # First contact: the worker stops at the unknown host key and shows its fingerprint.
    job = _wait_for(
        lambda: ProvisioningJob.objects.filter(pk=job_id, status="awaiting_host_key").first(),
        timeout=60,
        what="awaiting_host_key",
        diagnostics=diagnostics,
    )
    assert job.host_key_fingerprint == board.host_key_fingerprint
    accepted = admin.post(
        f"/api/v1/provisioning-jobs/{job_id}/accept-host-key/", {"fingerprint": board.host_key_fingerprint}
    )
    assert accepted.status_code == 200, accepted.content

    job = _wait_for(
        lambda: ProvisioningJob.objects.filter(pk=job_id, status__in=["succeeded", "failed"]).first(),
        timeout=240,
        what="the job to finish",
        diagnostics=diagnostics,
    )
    assert job.status == "succeeded", diagnostics()

    device = Device.objects.get(pk=job.device_id)
    assert device.enrollment_token_id == job.enrollment_token_id
    assert device.name == "provisioned-board"
    assert "provisioned" in device.tags
    assert job.credential_encrypted == ""
    assert job.enrollment_token is not None and job.enrollment_token.use_count == 1
    done = [s["step"] for s in job.steps if s["status"] == "ok"]
    for step in ("connect", "check_host", "upload", "install", "selftest", "config", "start", "enrolled"):
        assert step in done, done
    facts = job.host_facts
    assert facts["service"] == "nohup"
    assert facts["install_dir"] == str(install_dir)
    assert facts["importable"]["torch"] and facts["training"] == "torch"
    # The selftest trained a step with the board's torch before the agent was started.
    assert facts["selftest"]["ok"] and facts["selftest"]["training"]["backends"]["torch"]["ok"]

    # What is on the board: the bundle, a private config holding the token, a live agent.
    assert (install_dir / "flotilla-agent.tar.gz").stat().st_size > 1000
    config = install_dir / "agent.toml"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stat.S_IMODE(install_dir.stat().st_mode) == 0o700
    text = config.read_text()
    assert f'server_url = "{live_stack.url}"' in text
    assert f'enrollment_token = "{job.enrollment_token.prefix}' in text
    assert 'train = true\ntraining_backends = ["torch"]' in text
    pid = int((install_dir / "agent.pid").read_text())
    os.kill(pid, 0)  # raises if the agent is not running

    # The agent keeps talking to the server after enrolling, ready to train with torch.
    _wait_for(
        lambda: Device.objects.filter(
            pk=device.pk, last_seen__isnull=False, state__training_backends=["torch"]
        ).exists(),
        timeout=60,
        what="a heartbeat from the provisioned agent",
        diagnostics=diagnostics,
    )

    detail = operator.get(f"/api/v1/provisioning-jobs/{job_id}/").json()
    assert detail["status"] == "succeeded" and detail["device"] == str(device.pk)
    assert detail["has_credential"] is False

    # Provisioning the same board again (the key is known now) replaces the agent: the old
    # process stops, its state is kept aside, and the board enrolls as a new device.
    again = operator.post(
        "/api/v1/provisioning-jobs/",
        {
            "host": board.host,
            "port": board.port,
            "username": board.username,
            "private_key": board.private_key,
            "python": sys.executable,
            "packages": "system",
            "install_dir": str(install_dir),
            "server_url": live_stack.url,
            "name": "provisioned-board-2",
            "enrollment_timeout_s": 120,
        },
        format="json",
    )
    assert again.status_code == 201, again.content
    second = _wait_for(
        lambda: ProvisioningJob.objects.filter(
            pk=again.json()["id"], status__in=["succeeded", "failed"]
        ).first(),
        timeout=240,
        what="the second job to finish",
        diagnostics=diagnostics,
    )
    assert second.status == "succeeded", diagnostics()
    assert second.device_id != device.pk
    assert not [s for s in second.steps if s["step"] == "host_key"], "an accepted key needs no new acceptance"
    assert list(install_dir.glob("state.replaced-*"))
    # Training is off unless asked for, even on a board that has torch.
    assert second.host_facts["training"] == "none"
    assert "train = false" in config.read_text()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
