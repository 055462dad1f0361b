"""Provisioning jobs run in-process against the real sshd: host keys, credentials, retries."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from tests.fleet.provisioning.conftest import Board

pytestmark = pytest.mark.django_db


def _job(board: Board, **overrides: Any) -> Any:
    from fleet.services.provisioning import provisioning_job_create

    fields: dict[str, Any] = {
        "actor": None,
        "host": board.host,
        "port": board.port,
        "username": board.username,
        "private_key": board.private_key,
        # A Python that does not exist stops the job right after the host checks, so these
        # tests see connection and authentication without installing anything.
        "python": "/nonexistent/python3",
        "install_dir": str(board.root / "installs" / "unused"),
    }
    fields.update(overrides)
    return provisioning_job_create(**fields)


def _run_until_settled(job_id: int, *, max_runs: int = 10) -> Any:
    from fleet.models import ProvisioningJob
    from fleet.services.provisioning import provisioning_job_run

    for _ in range(max_runs):
        if provisioning_job_run(job_id=job_id) is None:
            break
        if ProvisioningJob.objects.get(pk=job_id).status == ProvisioningJob.Status.WAITING_ENROLLMENT:
            break
    return ProvisioningJob.objects.get(pk=job_id)


def test_unknown_host_key_pauses_the_job_until_an_admin_accepts_it(
    board: Board, admin_client_api: Any
) -> None:
    from fleet.models import KnownHost

    job = _job(board)
    job = _run_until_settled(job.pk)
    assert job.status == "awaiting_host_key"
    # The fingerprint is the one OpenSSH itself computes for the board's key.
    assert job.host_key_fingerprint == board.host_key_fingerprint
    assert job.host_key_b64 == board.host_key_b64
    assert job.steps[-1]["step"] == "host_key" and job.steps[-1]["status"] == "waiting"
    assert job.credential_encrypted, "the credential is kept while the job waits"
    assert not KnownHost.objects.exists()

    response = admin_client_api.post(
        f"/api/v1/provisioning-jobs/{job.pk}/accept-host-key/", {"fingerprint": board.host_key_fingerprint}
    )
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "queued"
    known = KnownHost.objects.get()
    assert (known.host, known.port, known.fingerprint) == (board.host, board.port, board.host_key_fingerprint)
    assert known.accepted_by == admin_client_api.user

    job = _run_until_settled(job.pk)
    # It got past the host key and authenticated: it now fails on the missing Python.
    assert job.status == "failed"
    assert job.error_code == "python_missing", job.error
    assert [s["step"] for s in job.steps if s["status"] == "ok"] == ["queued", "host_key", "connect"]
    assert job.credential_encrypted == ""


def test_changed_host_key_fails_without_authenticating(board: Board, db: Any) -> None:
    from fleet.models import KnownHost

    KnownHost.objects.create(
        host=board.host,
        port=board.port,
        key_type=board.host_key_type,
        key_b64=board.other_host_key_b64,
        fingerprint="SHA256:previous",
    )
    accepted_before = board.log().count("Accepted publickey")
    job = _run_until_settled(_job(board).pk)
    assert job.status == "failed"
    assert job.error_code == "host_key_changed"
    assert "HOST KEY CHANGED" in job.error and "man-in-the-middle" in job.error
    assert board.host_key_fingerprint in job.error
    assert job.attempts == 1, "a changed key is never retried"
    assert job.credential_encrypted == ""
    # The key check happens before authentication: the board never saw our credential.
    assert board.log().count("Accepted publickey") == accepted_before


def test_wrong_private_key_fails_permanently_and_wipes_it(accepted_board: Board) -> None:
    job = _run_until_settled(_job(accepted_board, private_key=accepted_board.other_private_key).pk)
    assert job.status == "failed"
    assert job.error_code == "auth_failed"
    assert "Authentication failed" in job.error and accepted_board.username in job.error
    assert job.attempts == 1
    assert job.credential_encrypted == ""
    assert job.finished_at is not None


def test_password_refused_by_a_key_only_board(accepted_board: Board) -> None:
    job = _run_until_settled(_job(accepted_board, private_key=None, password="not-the-password").pk)
    assert job.status == "failed"
    assert job.error_code == "auth_failed"
    assert job.credential_encrypted == ""


def test_unreachable_board_fails_after_bounded_retries(board: Board, settings: Any) -> None:
    from fleet.services.provisioning import max_attempts

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    job = _run_until_settled(_job(board, port=closed_port).pk)
    assert job.status == "failed"
    assert job.error_code == "unreachable"
    assert job.attempts == max_attempts() == 3
    assert f"127.0.0.1:{closed_port}" in job.error and "gave up after 3 attempts" in job.error
    retries = [s for s in job.steps if s["status"] == "retry"]
    assert len(retries) == 2
    assert job.credential_encrypted == ""


def test_a_second_run_of_a_claimed_job_is_a_no_op(accepted_board: Board) -> None:
    from fleet.models import ProvisioningJob
    from fleet.services.provisioning import provisioning_job_run

    job = _run_until_settled(_job(accepted_board).pk)
    assert job.status == "failed"
    steps = list(job.steps)
    assert provisioning_job_run(job_id=job.pk) is None
    job = ProvisioningJob.objects.get(pk=job.pk)
    assert job.status == "failed" and job.steps == steps and job.attempts == 1


def test_credential_is_encrypted_at_rest(board: Board, settings: Any) -> None:
    import os
    import stat

    from fleet.services.provisioning import credential_decrypt

    job = _job(board)
    assert board.private_key not in job.credential_encrypted
    assert "PRIVATE KEY" not in job.credential_encrypted
    assert credential_decrypt(job.credential_encrypted) == board.private_key
    key_file = settings.PROVISIONING_KEY_FILE
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600


def test_a_job_whose_worker_died_is_taken_over_after_its_lease(accepted_board: Board) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from fleet.models import ProvisioningJob
    from fleet.services.provisioning import provisioning_job_run

    job = _job(accepted_board)
    # As a worker killed mid-upload leaves it: a running state and a lease.
    ProvisioningJob.objects.filter(pk=job.pk).update(
        status="uploading", attempts=1, locked_until=timezone.now() + timedelta(minutes=5)
    )
    assert provisioning_job_run(job_id=job.pk) is None
    assert ProvisioningJob.objects.get(pk=job.pk).status == "uploading", "a live lease is respected"

    ProvisioningJob.objects.filter(pk=job.pk).update(locked_until=timezone.now() - timedelta(seconds=1))
    job = _run_until_settled(job.pk)
    assert job.attempts == 2
    assert job.status == "failed" and job.error_code == "python_missing"


def test_a_board_that_never_enrolls_fails_at_the_deadline(db: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from fleet.models import Device, ProvisioningJob
    from fleet.services.enrollment import enrollment_token_create
    from fleet.services.provisioning import enrollment_poll_s, provisioning_job_run

    token, _ = enrollment_token_create(actor=None, name="t", max_uses=1)
    job = ProvisioningJob.objects.create(
        host="board.invalid",
        username="pi",
        auth_method="key",
        status="waiting_enrollment",
        enrollment_token=token,
        enrollment_deadline=timezone.now() + timedelta(minutes=5),
        host_facts={"install_dir": "/home/pi/.flotilla"},
    )
    assert provisioning_job_run(job_id=job.pk) == enrollment_poll_s()
    ProvisioningJob.objects.filter(pk=job.pk).update(
        enrollment_deadline=timezone.now() - timedelta(seconds=1)
    )
    assert provisioning_job_run(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == "failed" and job.error_code == "enrollment_timeout"
    assert "/home/pi/.flotilla/agent.log" in job.error
    token.refresh_from_db()
    assert token.revoked_at is not None, "the unused token must not stay valid"
    assert not Device.objects.exists()


def test_enrollment_links_the_device_and_succeeds(db: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from fleet.models import ProvisioningJob
    from fleet.services.enrollment import device_enroll, enrollment_token_create
    from fleet.services.provisioning import provisioning_job_run

    token_row, token = enrollment_token_create(actor=None, name="t", max_uses=1)
    job = ProvisioningJob.objects.create(
        host="board.invalid",
        username="pi",
        auth_method="key",
        status="waiting_enrollment",
        enrollment_token=token_row,
        enrollment_deadline=timezone.now() + timedelta(minutes=5),
    )
    device, _ = device_enroll(token=token, name="board", hardware={"arch": "aarch64"})
    assert provisioning_job_run(job_id=job.pk) is None
    job.refresh_from_db()
    assert job.status == "succeeded" and job.device == device and job.finished_at is not None
    assert provisioning_job_run(job_id=job.pk) is None  # a duplicate delivery changes nothing
    assert ProvisioningJob.objects.get(pk=job.pk).steps == job.steps


def test_agent_bundle_is_reproducible_and_holds_the_package(db: Any) -> None:
    import io
    import tarfile

    from fleet.services.provisioning import agent_bundle

    first = agent_bundle()
    assert agent_bundle() == first
    # The gzip header's MTIME field (bytes 4-7) is fixed too, not the time of the call.
    assert first[4:8] == bytes(4)
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        names = tar.getnames()
    assert "flotilla-agent/pyproject.toml" in names
    assert "flotilla-agent/build_backend.py" in names
    assert "flotilla-agent/devices_agent/__init__.py" in names
    assert "flotilla-agent/devices_agent/wire.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_a_board_that_never_answers_times_out_and_is_retried(board: Board, settings: Any) -> None:
    settings.PROVISIONING_SSH_TIMEOUT_S = 0.5
    # Accepts TCP connections (the kernel's backlog) but never sends an SSH banner.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        job = _run_until_settled(_job(board, port=silent.getsockname()[1]).pk)
    assert job.status == "failed"
    assert job.error_code in {"timeout", "unreachable"}, job.error
    assert job.attempts == 3
    assert job.credential_encrypted == ""


def test_resume_finds_jobs_whose_next_run_was_lost(db: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    from fleet.models import ProvisioningJob
    from fleet.services.provisioning import provisioning_jobs_resume

    def make(**fields: Any) -> int:
        job = ProvisioningJob.objects.create(host="b.invalid", username="pi", auth_method="key", **fields)
        return int(job.pk)

    now = timezone.now()
    lost_retry = make(status="queued", next_attempt_at=now - timedelta(minutes=5))
    fresh = make(status="queued")
    scheduled = make(status="queued", next_attempt_at=now + timedelta(seconds=30))
    dead_worker = make(status="configuring", locked_until=now - timedelta(seconds=1))
    live_worker = make(status="configuring", locked_until=now + timedelta(minutes=5))
    ProvisioningJob.objects.filter(pk=fresh).update(created_at=now)
    waiting = make(status="waiting_enrollment", enrollment_deadline=now - timedelta(seconds=1))

    assert sorted(provisioning_jobs_resume()) == sorted([lost_retry, dead_worker])
    assert {fresh, scheduled, live_worker}.isdisjoint(provisioning_jobs_resume())
    # Waiting jobs are polled in place: this one is past its deadline.
    assert ProvisioningJob.objects.get(pk=waiting).status == "failed"


def test_an_invalid_provisioning_key_is_a_clear_error(settings: Any) -> None:
    from core.api import ServiceError
    from fleet.services.provisioning import credential_encrypt

    settings.PROVISIONING_KEY = "not-a-fernet-key"
    with pytest.raises(ServiceError, match="not a valid Fernet key"):
        credential_encrypt("secret")


def test_only_wheels_for_the_boards_architecture_are_uploaded() -> None:
    from fleet.services.provisioning import wheel_fits

    arm = "numpy-2.3.3-cp311-cp311-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl"
    x86 = "numpy-2.3.3-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
    assert wheel_fits(arm, "aarch64") and not wheel_fits(arm, "x86_64")
    assert wheel_fits(x86, "x86_64") and not wheel_fits(x86, "aarch64")
    assert wheel_fits("httpx-0.28.1-py3-none-any.whl", "armv7l")
    assert wheel_fits("psutil-7.1.0-cp36-abi3-linux_armv7l.whl", "armv7l")
    assert wheel_fits("cerberus-1.3.5.tar.gz", "aarch64"), "a source distribution builds anywhere"
    assert not wheel_fits("README.txt", "x86_64")


def test_the_agent_config_turns_training_on_only_with_the_backends_it_got() -> None:
    import tomllib

    from devices_agent.config import config_from_mapping
    from fleet.services.provisioning import agent_config_toml

    common: dict[str, Any] = {"server_url": "https://fleet.example", "token": "et_x", "state_dir": "/s"}
    trains = tomllib.loads(agent_config_toml(**common, name="b", training_backends=["ort"]))
    assert (trains["train"], trains["training_backends"]) == (True, ["ort"])
    serves = tomllib.loads(agent_config_toml(**common, name=""))
    assert serves["train"] is False and "training_backends" not in serves
    # The agent itself accepts both files.
    assert config_from_mapping(trains).training_backends == ["ort"]
    assert config_from_mapping(serves).train is False
