"""SSH provisioning: install the agent on a board, start it, and wait until it enrolls.

A job is a row with a lifecycle (queued → connecting → uploading → configuring → starting →
waiting_enrollment → succeeded, or failed / cancelled, or paused in awaiting_host_key until
an admin accepts the board's host key). The Celery task only calls `provisioning_job_run`,
which claims the job with a conditional UPDATE, so a duplicate delivery is a no-op, and
returns when to run again (retry backoff, enrollment polling) instead of sleeping.

The SSH credential is Fernet-encrypted at rest and wiped once the SSH work ends, whether it
succeeded or failed; a retry needs the credential again.

On the board the agent gets a venv with its dependencies at the server's pinned versions
(`fleet.board_packages`), from a package index, a wheelhouse, or the board's own Python
(`packages`), optionally with a training runtime (`training`), and is proven by its
selftest (a real inference, and a training step when it trains) before it is started.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import shlex
import signal
import tarfile
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.db.models.functions import Coalesce
from django.utils import timezone

from core.api import ConflictError, NotFoundError, ServiceError
from core.audit.services import audit_record
from core.dispatch import enqueue_on_commit
from core.events import emit
from core.leases import Lease
from fleet.agent_setup import agent_tls_options
from fleet.auth import hash_secret, new_secret
from fleet.board_packages import (
    PACKAGE_SOURCES,
    TRAINING_BACKENDS,
    TRAINING_CHOICES,
    BoardPackagesError,
    bare_requirements_file,
    board_requirements,
    constraints,
    ort_training_supported,
    requirements_file,
    training_choice,
)
from fleet.models import Device, DeviceGroup, EnrollmentToken, KnownHost, ProvisioningJob
from fleet.ssh import HostKey, SshError, SshTransport, UnknownHostKeyError

logger = logging.getLogger(__name__)

Status = ProvisioningJob.Status

AGENT_PACKAGE_DIR = Path(__file__).resolve().parent.parent.parent / "devices_agent"
DEPLOY_DIR = AGENT_PACKAGE_DIR / "deploy"
DEFAULT_INSTALL_DIR = "~/.flotilla"
BUNDLE_NAME = "flotilla-agent.tar.gz"
REQUIREMENTS_NAME = "requirements.txt"
# Read by install.sh beside the requirement file: packages installed with --no-deps.
BARE_REQUIREMENTS_NAME = "requirements-bare.txt"
CONSTRAINTS_NAME = "constraints.txt"
WHEELHOUSE_NAME = "wheelhouse"
MIN_PYTHON = (3, 11)
# A board with internet installs the pinned packages from the index; one without needs a
# wheelhouse or a prepared image, and says so.
DEFAULT_PACKAGES = "index"
# Training is opt-in: PyTorch alone is a few hundred MB to download and about 1 GB on
# disk, and a board serves models without it.
DEFAULT_TRAINING = "none"
# install.sh's exit codes for the two ways the packages step fails.
EXIT_PIP_FAILED = 10
EXIT_PACKAGES_MISSING = 11


def _setting(name: str, default: Any) -> Any:
    return getattr(settings, name, default)


def max_attempts() -> int:
    """Connection attempts before an unreachable board fails the job."""
    return int(_setting("PROVISIONING_MAX_ATTEMPTS", 3))


def retry_delay(attempt: int) -> float:
    """Seconds before attempt `attempt + 1`: exponential, capped."""
    base = float(_setting("PROVISIONING_RETRY_BASE_S", 5.0))
    return float(min(300.0, base * 2 ** max(0, attempt - 1)))


def enrollment_poll_s() -> float:
    return float(_setting("PROVISIONING_POLL_INTERVAL_S", 3.0))


def task_time_limit_s() -> int:
    """How long one run of the provisioning task may take: installing PyTorch on a slow
    board takes minutes, far longer than the default limit of Celery tasks."""
    return int(_setting("PROVISIONING_TASK_TIME_LIMIT_S", 1800))


# --- credentials at rest ----------------------------------------------------------------


def _fernet(key: bytes) -> Fernet:
    try:
        return Fernet(key)
    except ValueError as exc:
        raise ServiceError(
            "PROVISIONING_KEY is not a valid Fernet key (32 url-safe base64-encoded bytes).",
            code="provisioning_key_invalid",
            status_code=503,
        ) from exc


def _fernet_key() -> bytes:
    configured: str = _setting("PROVISIONING_KEY", "")
    if configured:
        return configured.encode()
    key_file = _setting("PROVISIONING_KEY_FILE", None)
    if not key_file:
        raise ServiceError(
            "PROVISIONING_KEY is not set: provisioning credentials cannot be encrypted.",
            code="provisioning_key_missing",
            status_code=503,
        )
    path = Path(key_file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written to a private temp file, then hard-linked into place: link() fails if the
        # file exists, so concurrent processes agree on the first key and nobody ever reads
        # a half-written one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".provisioning-key-")
        try:
            os.write(fd, Fernet.generate_key())
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    return path.read_bytes().strip()


def credential_encrypt(secret: str) -> str:
    """Encrypt an SSH credential for storage."""
    return _fernet(_fernet_key()).encrypt(secret.encode()).decode()


def credential_decrypt(token: str) -> str:
    """Decrypt a stored credential; raises ServiceError when the key changed."""
    try:
        return _fernet(_fernet_key()).decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise ServiceError(
            "The stored credential cannot be decrypted (was PROVISIONING_KEY changed?).",
            code="credential_unreadable",
        ) from exc


# --- the agent bundle -------------------------------------------------------------------

_PYPROJECT = """\
[build-system]
requires = []
build-backend = "build_backend"
backend-path = ["."]

[project]
name = "flotilla-agent"
dynamic = ["version"]
"""


def agent_bundle() -> bytes:
    """A tar.gz of the `devices_agent` package with a pyproject and a dependency-free backend.

    `pip install --no-index --no-deps <bundle>` builds and installs it offline. Members have
    fixed times and owners (the gzip header too), so the same sources give the same bytes.
    """
    buffer = io.BytesIO()

    def add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(f"flotilla-agent/{name}")
        info.size = len(data)
        info.mode = mode
        info.mtime = 0
        tar.addfile(info, io.BytesIO(data))

    # The gzip header carries a time too; 0 keeps it out of the bytes.
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as compressed,
        tarfile.open(fileobj=compressed, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        add(tar, "pyproject.toml", _PYPROJECT.encode())
        add(tar, "build_backend.py", (DEPLOY_DIR / "build_backend.py").read_bytes())
        for path in sorted(AGENT_PACKAGE_DIR.rglob("*")):
            if path.is_dir() or "__pycache__" in path.parts or path.suffix in {".pyc", ".pyo"}:
                continue
            mode = 0o755 if path.suffix == ".sh" else 0o644
            add(
                tar,
                f"devices_agent/{path.relative_to(AGENT_PACKAGE_DIR).as_posix()}",
                path.read_bytes(),
                mode,
            )
    return buffer.getvalue()


def agent_config_toml(
    *, server_url: str, token: str, state_dir: str, name: str, training_backends: list[str] | None = None
) -> str:
    """The agent's config file. JSON string and array literals are valid TOML.

    ``training_backends`` are the backends the board was given packages for; none (or an
    empty list) turns training off, so the agent never picks up a runtime it happens to see.
    """
    lines = [
        "# Written by Flotilla provisioning. The token is single-use and expires.",
        f"server_url = {json.dumps(server_url)}",
        f"enrollment_token = {json.dumps(token)}",
        f"state_dir = {json.dumps(state_dir)}",
    ]
    # allow_insecure_http only when this server itself is on plain HTTP; a pin when set.
    for key, value in agent_tls_options(server_url).items():
        lines.append(f"{key} = {json.dumps(value)}")
    if name:
        lines.append(f"name = {json.dumps(name)}")
    if training_backends:
        lines.append("train = true")
        lines.append(f"training_backends = {json.dumps(training_backends)}")
    else:
        lines.append("train = false")
    return "\n".join(lines) + "\n"


# --- operator actions -------------------------------------------------------------------


def _enqueue(job_id: int) -> None:
    enqueue_on_commit("fleet.provision_device", job_id)


def _changed(job_id: int) -> None:
    """The job moved on or logged a step: the dashboard's provisioning pages refresh."""
    emit("provisioning_job.changed", {"job_id": job_id})


def _credential(private_key: str | None, password: str | None) -> tuple[str, str]:
    if bool(private_key) == bool(password):
        raise ServiceError("Give exactly one of private_key or password.", code="validation_error")
    if private_key:
        from fleet.ssh import load_private_key

        try:
            load_private_key(private_key)
        except SshError as exc:
            raise ServiceError(exc.message, code="invalid_private_key") from exc
        return ProvisioningJob.AuthMethod.KEY, private_key
    assert password is not None
    return ProvisioningJob.AuthMethod.PASSWORD, password


def _step_entry(step: str, status: str, message: str = "") -> dict[str, str]:
    return {"ts": timezone.now().isoformat(), "step": step, "status": status, "message": message}


def _package_options(*, packages: str, training: str, wheelhouse: str) -> dict[str, str]:
    """Check where the board's packages come from and which training set it gets."""
    packages = packages or DEFAULT_PACKAGES
    training = training or DEFAULT_TRAINING
    if packages not in PACKAGE_SOURCES:
        raise ServiceError(
            f"Unknown packages {packages!r}; use one of: {', '.join(PACKAGE_SOURCES)}.",
            code="validation_error",
        )
    if training not in TRAINING_CHOICES:
        raise ServiceError(
            f"Unknown training {training!r}; use one of: {', '.join(TRAINING_CHOICES)}.",
            code="validation_error",
        )
    if wheelhouse and packages != "wheelhouse":
        raise ServiceError("A wheelhouse is only used with packages=wheelhouse.", code="validation_error")
    if wheelhouse and not wheelhouse.startswith("/"):
        raise ServiceError(
            "wheelhouse is a directory on the board: give an absolute path.", code="validation_error"
        )
    if packages == "wheelhouse" and not wheelhouse:
        local = str(_setting("PROVISIONING_WHEELHOUSE", "") or "")
        if not local or not Path(local).is_dir():
            raise ServiceError(
                "packages=wheelhouse needs a wheelhouse: set PROVISIONING_WHEELHOUSE to a directory of "
                "wheels on the server (it is uploaded), or give wheelhouse, a directory on the board.",
                code="wheelhouse_missing",
            )
    options = {"packages": packages, "training": training}
    if wheelhouse:
        options["wheelhouse"] = wheelhouse
    return options


def provisioning_job_create(
    *,
    actor: Any,
    host: str,
    username: str,
    port: int = 22,
    private_key: str | None = None,
    password: str | None = None,
    python: str = "",
    install_dir: str = "",
    server_url: str = "",
    name: str = "",
    group: DeviceGroup | None = None,
    tags: list[str] | None = None,
    enrollment_timeout_s: int | None = None,
    packages: str = "",
    training: str = "",
    wheelhouse: str = "",
    remote_addr: str | None = None,
) -> ProvisioningJob:
    """Queue the installation of the agent on `username@host:port`.

    ``packages`` (index, wheelhouse or system) says where the agent's dependencies come
    from, ``training`` (none, torch, onnxruntime or auto) which training runtime is added,
    ``wheelhouse`` a directory of wheels already on the board (else PROVISIONING_WHEELHOUSE
    is uploaded).
    """
    auth_method, secret = _credential(private_key, password)
    options: dict[str, Any] = {
        "python": python or "python3",
        "install_dir": install_dir or DEFAULT_INSTALL_DIR,
        "server_url": server_url or settings.PUBLIC_BASE_URL,
        "name": name,
        "enrollment_timeout_s": enrollment_timeout_s or int(_setting("PROVISIONING_ENROLL_TIMEOUT_S", 300)),
        **_package_options(packages=packages, training=training, wheelhouse=wheelhouse),
    }
    with transaction.atomic():
        job = ProvisioningJob.objects.create(
            host=host,
            port=port,
            username=username,
            auth_method=auth_method,
            credential_encrypted=credential_encrypt(secret),
            options=options,
            group=group,
            tags=list(dict.fromkeys(tags or [])),
            steps=[_step_entry("queued", "ok", "")],
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        audit_record(
            actor=actor,
            action="provisioning_job.create",
            target=job,
            data={
                "host": host,
                "port": port,
                "username": username,
                "auth_method": auth_method,
                "options": options,
                "group": group.pk if group else None,
                "tags": job.tags,
            },
            remote_addr=remote_addr,
        )
        _enqueue(job.pk)
        _changed(job.pk)
    return job


def _locked_job(job_id: int) -> ProvisioningJob:
    job = ProvisioningJob.objects.select_for_update().filter(pk=job_id).first()
    if job is None:
        raise NotFoundError("No such provisioning job.", code="not_found")
    return job


def provisioning_job_accept_host_key(
    *, actor: Any, job_id: int, fingerprint: str, remote_addr: str | None = None
) -> ProvisioningJob:
    """Trust the host key the job saw, after an admin compared `fingerprint` on the board."""
    with transaction.atomic():
        job = _locked_job(job_id)
        if job.status != Status.AWAITING_HOST_KEY:
            raise ConflictError(
                f"The job is {job.status}, not awaiting a host key.", code="not_awaiting_host_key"
            )
        if fingerprint.strip() != job.host_key_fingerprint:
            raise ServiceError(
                "The fingerprint does not match the key the board offered.",
                code="fingerprint_mismatch",
                details={"offered": job.host_key_fingerprint},
            )
        known, created = KnownHost.objects.get_or_create(
            host=job.host,
            port=job.port,
            key_type=job.host_key_type,
            defaults={
                "key_b64": job.host_key_b64,
                "fingerprint": job.host_key_fingerprint,
                "accepted_by": actor if getattr(actor, "is_authenticated", False) else None,
            },
        )
        if not created and known.key_b64 != job.host_key_b64:
            raise ConflictError(
                "Another key of this type is already accepted for this host; forget it first.",
                code="known_host_conflict",
            )
        job.status = Status.QUEUED
        job.steps = [*job.steps, _step_entry("host_key", "ok", f"accepted {job.host_key_fingerprint}")]
        job.save(update_fields=["status", "steps"])
        audit_record(
            actor=actor,
            action="provisioning_job.accept_host_key",
            target=job,
            data={"fingerprint": job.host_key_fingerprint, "known_host": known.pk},
            remote_addr=remote_addr,
        )
        _enqueue(job.pk)
        _changed(job.pk)
    return job


def provisioning_job_retry(
    *,
    actor: Any,
    job_id: int,
    private_key: str | None = None,
    password: str | None = None,
    remote_addr: str | None = None,
) -> ProvisioningJob:
    """Run a failed or cancelled job again; the credential was wiped, so it is given again."""
    auth_method, secret = _credential(private_key, password)
    with transaction.atomic():
        job = _locked_job(job_id)
        if job.status not in (Status.FAILED, Status.CANCELLED):
            raise ConflictError(f"Only failed or cancelled jobs can be retried (this one is {job.status}).")
        job.status = Status.QUEUED
        job.auth_method = auth_method
        job.credential_encrypted = credential_encrypt(secret)
        job.error = ""
        job.error_code = ""
        job.attempts = 0
        job.finished_at = None
        job.locked_until = None
        job.steps = [*job.steps, _step_entry("retry", "ok", "queued again")]
        job.save()
        audit_record(actor=actor, action="provisioning_job.retry", target=job, remote_addr=remote_addr)
        _enqueue(job.pk)
        _changed(job.pk)
    return job


def provisioning_job_cancel(*, actor: Any, job_id: int, remote_addr: str | None = None) -> ProvisioningJob:
    """Stop a job that has not finished; a step already running on the board completes first."""
    with transaction.atomic():
        job = _locked_job(job_id)
        if job.status in ProvisioningJob.TERMINAL:
            raise ConflictError(f"The job already ended ({job.status}).", code="already_finished")
        job.status = Status.CANCELLED
        job.credential_encrypted = ""
        job.finished_at = timezone.now()
        job.steps = [*job.steps, _step_entry("cancel", "ok", "cancelled by operator")]
        job.save(update_fields=["status", "credential_encrypted", "finished_at", "steps"])
        _revoke_token(job)
        audit_record(actor=actor, action="provisioning_job.cancel", target=job, remote_addr=remote_addr)
        _changed(job.pk)
    return job


def known_host_forget(*, actor: Any, known_host_id: int, remote_addr: str | None = None) -> None:
    """Remove an accepted host key; the next job to that host stops for a new acceptance."""
    with transaction.atomic():
        known = KnownHost.objects.select_for_update().filter(pk=known_host_id).first()
        if known is None:
            raise NotFoundError("No such known host.", code="not_found")
        audit_record(
            actor=actor,
            action="known_host.forget",
            target=known,
            data={"host": known.host, "port": known.port, "fingerprint": known.fingerprint},
            remote_addr=remote_addr,
        )
        known.delete()


# --- the run ----------------------------------------------------------------------------


class _Stopped(Exception):
    """The job left the state this run expected (cancelled meanwhile): stop quietly."""


def _update(job: ProvisioningJob, *, expect: str, **fields: Any) -> None:
    """Write fields only while the job is still in `expect`, so a cancel is never overwritten."""
    updated = ProvisioningJob.objects.filter(pk=job.pk, status=expect).update(**fields)
    if not updated:
        raise _Stopped
    for name, value in fields.items():
        setattr(job, name, value)
    _changed(job.pk)


def _log(job: ProvisioningJob, step: str, status: str, message: str = "") -> None:
    _update(job, expect=job.status, steps=[*job.steps, _step_entry(step, status, message)])


def _advance(job: ProvisioningJob, new_status: str, message: str = "") -> None:
    _update(
        job,
        expect=job.status,
        status=new_status,
        steps=[*job.steps, _step_entry(new_status, "started", message)],
        locked_until=LEASE.until(),
    )


def _lease_s() -> float:
    # Longer than the task's hard time limit: a job in a running state past its lease
    # belongs to a worker that died, and a redelivered task may take it over.
    return float(task_time_limit_s() + 120)


LEASE = Lease(ProvisioningJob, "locked_until", _lease_s)


def _claim(job_id: int) -> bool:
    now = timezone.now()
    token = LEASE.claim(
        job_id,
        where=Q(status=Status.QUEUED) | Q(status__in=ProvisioningJob.RUNNING),
        now=now,
        status=Status.CONNECTING,
        attempts=F("attempts") + 1,
        started_at=Coalesce(F("started_at"), now),
    )
    return token is not None


def _revoke_token(job: ProvisioningJob) -> None:
    if job.enrollment_token_id and not Device.objects.filter(enrollment_token_id=job.enrollment_token_id):
        EnrollmentToken.objects.filter(pk=job.enrollment_token_id, revoked_at=None).update(
            revoked_at=timezone.now()
        )


def _fail(job: ProvisioningJob, *, code: str, message: str) -> None:
    with transaction.atomic():
        updated = (
            ProvisioningJob.objects.filter(pk=job.pk)
            .exclude(status__in=ProvisioningJob.TERMINAL)
            .update(
                status=Status.FAILED,
                error=message,
                error_code=code,
                credential_encrypted="",
                finished_at=timezone.now(),
                locked_until=None,
                steps=[*job.steps, _step_entry(job.status, "failed", message)],
            )
        )
        if updated:
            job.refresh_from_db()
            _revoke_token(job)
            _changed(job.pk)
    logger.info("provisioning job %s failed (%s): %s", job.pk, code, message)


def _create_token(job: ProvisioningJob, *, timeout_s: int) -> tuple[EnrollmentToken, str]:
    expires_at = timezone.now() + timedelta(seconds=timeout_s + 300)
    name = f"provisioning job {job.pk}"
    try:
        from fleet.services.enrollment import enrollment_token_create
    except ImportError:  # pragma: no cover - the enrollment service ships with the fleet app
        secret = new_secret()
        token = EnrollmentToken.objects.create(
            name=name,
            token_hash=hash_secret(secret),
            prefix=secret[:8],
            group=job.group,
            tags=job.tags,
            max_uses=1,
            expires_at=expires_at,
            created_by=job.created_by,
        )
        return token, secret
    return enrollment_token_create(
        actor=job.created_by, name=name, group=job.group, tags=job.tags, max_uses=1, expires_at=expires_at
    )


def _remote_dir_expr(install_dir: str) -> str:
    if install_dir == "~":
        return '"$HOME"'
    if install_dir.startswith("~/"):
        return '"$HOME"/' + shlex.quote(install_dir[2:])
    return shlex.quote(install_dir)


def _checked(ssh: SshTransport, command: str, *, step: str, timeout: float = 60.0) -> str:
    code, out, err = ssh.run(command, timeout=timeout)
    if code != 0:
        detail = (err.strip() or out.strip())[-1500:]
        raise SshError(f"{step} failed (exit {code}): {detail}", permanent=True, code=f"{step}_failed")
    return out


def _exit_said(code: int) -> str:
    if code > 128:
        try:
            name = signal.Signals(code - 128).name
        except ValueError:
            name = f"signal {code - 128}"
        return f"killed by {name}"
    return f"exit {code}"


def _tail(text: str, lines: int = 12, chars: int = 1500) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][-lines:]
    return "\n".join(kept)[-chars:]


# Imports whose outcome decides what the board gets; each runs in its own interpreter, since
# a broken native library can kill the process (an illegal instruction on an old ARM core).
_PROBED_MODULES = ("numpy", "onnxruntime", "torch")
_PROBE = (
    "import importlib.util, json, {module}; "
    "print(json.dumps({{'version': str(getattr({module}, '__version__', '') or 'unknown'), "
    "'training': importlib.util.find_spec('{module}.training') is not None}}))"
)


def _probe_imports(ssh: SshTransport, *, python: str) -> dict[str, Any]:
    importable: dict[str, str | None] = {}
    errors: dict[str, str] = {}
    ort_training = False
    for module in _PROBED_MODULES:
        probe = shlex.quote(_PROBE.format(module=module))
        # `|| exit $?` keeps the shell from exec'ing Python, so a crash is an exit code (128 + signal).
        code, out, err = ssh.run(f"{shlex.quote(python)} -c {probe} || exit $?", timeout=180)
        importable[module] = None
        if code == 0:
            try:
                found = json.loads(out.strip().splitlines()[-1])
            except (ValueError, IndexError):
                errors[module] = f"unreadable answer: {out.strip()[-200:]}"
                continue
            importable[module] = str(found["version"])
            if module == "onnxruntime":
                ort_training = bool(found["training"])
        elif code > 128:
            # The shell's own "Bus error" line names the command, not the fault.
            errors[module] = _exit_said(code)
        elif f"No module named '{module}'" not in err:
            errors[module] = _tail(err or out, lines=1, chars=300) or _exit_said(code)
    return {"importable": importable, "import_errors": errors, "onnxruntime_training": ort_training}


def _check_host(ssh: SshTransport, *, python: str, remote_dir: str) -> dict[str, Any]:
    arch = _checked(ssh, "uname -m", step="check_host").strip()
    system = _checked(ssh, "uname -s", step="check_host").strip()
    code, out, err = ssh.run(
        f"{shlex.quote(python)} -c 'import sys; print(\"%d.%d.%d\" % sys.version_info[:3])'", timeout=30
    )
    if code != 0:
        raise SshError(
            f"No usable Python at {python!r} on the board: {(err or out).strip()[-300:]}",
            permanent=True,
            code="python_missing",
        )
    version = out.strip()
    if tuple(int(p) for p in version.split(".")[:2]) < MIN_PYTHON:
        raise SshError(
            f"The agent needs Python >= {'.'.join(map(str, MIN_PYTHON))}; {python} is {version}.",
            permanent=True,
            code="python_too_old",
        )
    df = _checked(ssh, f"df -Pk {shlex.quote(remote_dir)} | tail -n 1", step="check_host").split()
    free_mb = int(df[3]) // 1024 if len(df) > 3 and df[3].isdigit() else None
    min_free = int(_setting("PROVISIONING_MIN_FREE_MB", 50))
    if free_mb is not None and free_mb < min_free:
        raise SshError(
            f"Only {free_mb} MB free in {remote_dir}; at least {min_free} MB needed.",
            permanent=True,
            code="disk_full",
        )
    code, out, _ = ssh.run(
        'if [ "$(id -u)" = 0 ] && command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; '
        "then echo systemd; else echo nohup; fi",
        timeout=30,
    )
    return {
        "arch": arch,
        "os": system,
        "python": version,
        "free_mb": free_mb,
        "service": out.strip() or "nohup",
        **_probe_imports(ssh, python=python),
    }


def _redacted(url: str) -> str:
    """A URL without its user and password (index URLs may carry a token)."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _pip_options(*, source: str, wheelhouse: str, constraints_path: str) -> tuple[list[str], str]:
    """pip's options for the board, and where the packages come from, said without secrets."""
    options = ["-c", constraints_path]
    sources: list[str] = []
    if source == "wheelhouse":
        options += ["--no-index", "--find-links", wheelhouse]
        sources.append(f"the wheelhouse {wheelhouse}")
    else:
        index = str(_setting("PROVISIONING_PIP_INDEX_URL", "") or "")
        if index:
            options += ["--index-url", index]
        sources.append(_redacted(index) if index else "pip's default index")
        for url in _setting("PROVISIONING_PIP_EXTRA_INDEX_URLS", []) or []:
            options += ["--extra-index-url", str(url)]
            sources.append(_redacted(str(url)))
    for link in _setting("PROVISIONING_PIP_FIND_LINKS", []) or []:
        options += ["--find-links", str(link)]
        sources.append(_redacted(str(link)))
    return options, ", ".join(sources)


def wheel_fits(filename: str, arch: str) -> bool:
    """Whether a wheelhouse file may be of use on a board of `arch` (judged by its name)."""
    if not filename.endswith(".whl"):
        return filename.endswith((".tar.gz", ".zip"))  # a source distribution builds anywhere
    platforms = filename[: -len(".whl")].split("-")[-1].split(".")
    return any(tag == "any" or tag.endswith(arch) for tag in platforms)


def _upload_wheelhouse(job: ProvisioningJob, ssh: SshTransport, *, remote: str, arch: str) -> None:
    local = Path(str(_setting("PROVISIONING_WHEELHOUSE", "") or ""))
    if not str(local) or not local.is_dir():
        raise SshError(
            f"The server's wheelhouse {str(local)!r} (PROVISIONING_WHEELHOUSE) is not a directory.",
            permanent=True,
            code="wheelhouse_missing",
        )
    _checked(ssh, f"mkdir -p {shlex.quote(remote)}", step="upload")
    present = ssh.file_sizes(remote)
    files = sorted(p for p in local.iterdir() if p.is_file() and wheel_fits(p.name, arch))
    sent = sent_bytes = 0
    for path in files:
        size = path.stat().st_size
        # A file of the same name and size is the same wheel: re-provisioning sends nothing.
        if present.get(path.name) == size:
            continue
        ssh.upload_file(local_path=path, remote_path=f"{remote}/{path.name}")
        sent += 1
        sent_bytes += size
    _log(
        job,
        "upload",
        "ok",
        f"wheelhouse for {arch}: {len(files)} files, {sent} sent ({sent_bytes / 1e6:.0f} MB), "
        f"{len(files) - sent} already on the board",
    )


class _ProgressLog:
    """Lines of a long command (pip) into the job's step log as they come, at most once a second.

    Each write also renews the job's lease, so a long install is not taken for a dead worker.
    A job cancelled meanwhile stops the logging; the command itself runs to its end.
    """

    MAX_LINES = 300

    def __init__(self, job: ProvisioningJob, step: str, *, every_s: float = 1.0) -> None:
        self.job = job
        self.step = step
        self.every_s = every_s
        self.pending: list[dict[str, str]] = []
        self.count = 0
        self.stopped = False
        self.last = time.monotonic()

    def line(self, text: str) -> None:
        text = text.strip()
        # pip fetches each candidate's metadata before the wheel: noise in a step log.
        if not text or ".metadata (" in text or self.stopped:
            return
        self.count += 1
        if self.count > self.MAX_LINES:
            return
        self.pending.append(_step_entry(self.step, "progress", text[:300]))
        self.idle()

    def idle(self) -> None:
        if self.pending and time.monotonic() - self.last >= self.every_s:
            self.flush()

    def flush(self) -> None:
        self.last = time.monotonic()
        if not self.pending or self.stopped:
            return
        try:
            _update(
                self.job,
                expect=self.job.status,
                steps=[*self.job.steps, *self.pending],
                locked_until=LEASE.until(),
            )
        except _Stopped:
            self.stopped = True
        self.pending = []

    def close(self) -> None:
        if self.count > self.MAX_LINES:
            self.pending.append(
                _step_entry(self.step, "progress", f"… {self.count - self.MAX_LINES} more lines not shown")
            )
        self.flush()
        if self.stopped:
            raise _Stopped


def _selftest_summary(report: dict[str, Any]) -> str:
    versions = ", ".join(f"{name} {report[name]}" for name in _PROBED_MODULES if report.get(name))
    inference = report.get("inference") or {}
    parts = [
        f"inference {'ok' if inference.get('ok') else 'FAILED'}"
        + (f" ({inference['latency_ms']} ms)" if inference.get("ok") else f": {inference.get('reason', '')}"),
        versions,
    ]
    training = report.get("training")
    if training is not None:
        backends = training.get("backends") or {}
        said = "; ".join(
            f"{name} {'ok' if result.get('ok') else 'FAILED: ' + str(result.get('reason', ''))}"
            for name, result in backends.items()
        )
        parts.append(f"training {said or training.get('reason') or 'no backend'}")
    return "; ".join(p for p in parts if p)


def _selftest(job: ProvisioningJob, ssh: SshTransport, *, remote_dir: str, train: bool) -> dict[str, Any]:
    """Run the agent's selftest in its venv; a failing one fails the job with its report."""
    q = shlex.quote
    _log(job, "selftest", "started", "inference and a training step" if train else "inference")
    code, out, err = ssh.run(
        f"sh {q(remote_dir + '/install.sh')} selftest {q(remote_dir)}" + (" --train" if train else ""),
        timeout=float(_setting("PROVISIONING_SELFTEST_TIMEOUT_S", 600)),
    )
    report: dict[str, Any] | None = None
    try:
        parsed = json.loads(out.strip().splitlines()[-1])
        report = parsed if isinstance(parsed, dict) else None
    except (ValueError, IndexError):
        pass
    if code != 0 or report is None or not report.get("ok"):
        said = _selftest_summary(report) if report is not None else _tail(out, lines=5) or "no report"
        stderr = _tail(err, lines=8)
        if report is not None:
            _update(job, expect=job.status, host_facts={**job.host_facts, "selftest": report})
        raise SshError(
            f"The agent's selftest failed on the board ({_exit_said(code)}): {said}"
            + (f"\n{stderr}" if stderr else ""),
            permanent=True,
            code="selftest_failed",
        )
    _update(job, expect=job.status, host_facts={**job.host_facts, "selftest": report})
    _log(job, "selftest", "ok", _selftest_summary(report))
    return report


def _package_plan(job: ProvisioningJob, facts: dict[str, Any]) -> dict[str, Any]:
    """Which training set and requirement lines this board gets, from the job and the facts."""
    options = job.options
    source = str(options.get("packages") or "system")
    requested = str(options.get("training") or "none")
    training, why = training_choice(requested, facts=facts, packages=source)
    if training == "onnxruntime" and source != "system" and not ort_training_supported(facts):
        raise SshError(
            "ONNX Runtime training (onnxruntime-training-cpu) has wheels only for x86_64 Linux with "
            f"Python 3.10 to 3.12; this board is {facts.get('arch')} {facts.get('os')} with Python "
            f"{facts.get('python')}. Use training=torch.",
            permanent=True,
            code="training_unsupported",
        )
    try:
        requirements = board_requirements(training)
        pins = constraints(training)
    except BoardPackagesError as exc:
        raise ServiceError(str(exc), code="pins_unreadable") from exc
    return {
        "packages": source,
        "training": training,
        "training_reason": why,
        "requirements": requirements,
        "constraints": pins,
    }


def _run_over_ssh(job: ProvisioningJob, secret: str) -> None:
    options = job.options
    python = str(options.get("python") or "python3")
    known = [
        HostKey(key_type=k.key_type, key_b64=k.key_b64)
        for k in KnownHost.objects.filter(host=job.host, port=job.port)
    ]
    _log(job, "connect", "started", f"{job.username}@{job.host}:{job.port}")
    transport = SshTransport(
        host=job.host,
        port=job.port,
        username=job.username,
        known_keys=known,
        private_key=secret if job.auth_method == ProvisioningJob.AuthMethod.KEY else None,
        password=secret if job.auth_method == ProvisioningJob.AuthMethod.PASSWORD else None,
        timeout=float(_setting("PROVISIONING_SSH_TIMEOUT_S", 10.0)),
    )
    with transport as ssh:
        key = ssh.server_key
        _update(
            job,
            expect=job.status,
            host_key_type=key.key_type,
            host_key_b64=key.key_b64,
            host_key_fingerprint=key.fingerprint,
        )
        _log(job, "connect", "ok", f"host key {key.key_type} {key.fingerprint}")

        expr = _remote_dir_expr(str(options.get("install_dir") or DEFAULT_INSTALL_DIR))
        remote_dir = _checked(
            ssh, f"mkdir -p {expr} && chmod 700 {expr} && cd {expr} && pwd", step="check_host"
        ).strip()
        facts = _check_host(ssh, python=python, remote_dir=remote_dir)
        facts["install_dir"] = remote_dir
        _update(job, expect=job.status, host_facts=facts)
        found = ", ".join(f"{m} {v}" for m, v in facts["importable"].items() if v) or "none"
        broken = "".join(f"; {m} is broken: {e}" for m, e in facts["import_errors"].items())
        _log(
            job,
            "check_host",
            "ok",
            f"{facts['arch']} {facts['os']}, Python {facts['python']}, {facts['free_mb']} MB free, "
            f"{facts['service']}; imports {found}{broken}",
        )
        plan = _package_plan(job, facts)
        facts.update(plan)
        _update(job, expect=job.status, host_facts=facts)

        _advance(job, Status.UPLOADING)
        bundle = agent_bundle()
        q = shlex.quote
        ssh.upload(data=bundle, remote_path=f"{remote_dir}/{BUNDLE_NAME}")
        ssh.upload(
            data=(DEPLOY_DIR / "install.sh").read_bytes(), remote_path=f"{remote_dir}/install.sh", mode=0o700
        )
        ssh.upload(
            data=(DEPLOY_DIR / "flotilla-agent.service.in").read_bytes(),
            remote_path=f"{remote_dir}/flotilla-agent.service.in",
        )
        ssh.upload(
            data=requirements_file(plan["training"]).encode(), remote_path=f"{remote_dir}/{REQUIREMENTS_NAME}"
        )
        bare = bare_requirements_file(plan["training"])
        bare_path = f"{remote_dir}/{BARE_REQUIREMENTS_NAME}"
        if bare:
            ssh.upload(data=bare.encode(), remote_path=bare_path)
        else:
            ssh.run(f"rm -f {shlex.quote(bare_path)}", timeout=30)  # an earlier run's choice
        ssh.upload(
            data="".join(f"{line}\n" for line in plan["constraints"]).encode(),
            remote_path=f"{remote_dir}/{CONSTRAINTS_NAME}",
        )
        _log(job, "upload", "ok", f"{BUNDLE_NAME} ({len(bundle)} bytes), install.sh, {REQUIREMENTS_NAME}")
        source = plan["packages"]
        wheelhouse = str(options.get("wheelhouse") or "")
        if source == "wheelhouse" and not wheelhouse:
            wheelhouse = f"{remote_dir}/{WHEELHOUSE_NAME}"
            _upload_wheelhouse(job, ssh, remote=wheelhouse, arch=facts["arch"])

        _advance(job, Status.CONFIGURING)
        pip_options, said = _pip_options(
            source=source, wheelhouse=wheelhouse, constraints_path=f"{remote_dir}/{CONSTRAINTS_NAME}"
        )
        _log(
            job,
            "packages",
            "started",
            ("checking the board's own packages: " if source == "system" else f"from {said}: ")
            + ", ".join(plan["requirements"])
            + f"; training {plan['training']} ({plan['training_reason']})",
        )
        progress = _ProgressLog(job, "packages")
        code, out, err = ssh.run(
            " ".join(
                [
                    "sh",
                    q(f"{remote_dir}/install.sh"),
                    "install",
                    q(remote_dir),
                    q(f"{remote_dir}/{BUNDLE_NAME}"),
                    q(python),
                    q(source),
                    q(f"{remote_dir}/{REQUIREMENTS_NAME}"),
                    *(q(option) for option in pip_options),
                ]
            ),
            timeout=float(_setting("PROVISIONING_INSTALL_TIMEOUT_S", 1500)),
            on_line=progress.line,
            on_idle=progress.idle,
        )
        progress.close()
        if code == EXIT_PIP_FAILED:
            raise SshError(
                f"pip could not install the agent's packages from {said}:\n{_tail(err or out)}",
                permanent=True,
                code="packages_failed",
            )
        if code == EXIT_PACKAGES_MISSING:
            raise SshError(
                f"The board's Python {python} lacks packages the agent needs (packages=system installs "
                f"nothing; use index or wheelhouse):\n{_tail(err or out)}",
                permanent=True,
                code="packages_missing",
            )
        if code != 0:
            raise SshError(
                f"install failed (exit {code}): {_tail(err or out)}", permanent=True, code="install_failed"
            )
        _log(job, "install", "ok", _tail(out, lines=1, chars=300))

        backends = TRAINING_BACKENDS[plan["training"]]
        # --train checks every backend the board has: a torch step, or that ONNX Runtime's
        # training API loads (its graphs come from the server per version).
        _selftest(job, ssh, remote_dir=remote_dir, train=bool(backends))

        # A fresh single-use token per run: an earlier run's token may sit in an old config.
        _revoke_token(job)
        timeout_s = int(options.get("enrollment_timeout_s") or 300)
        token, token_secret = _create_token(job, timeout_s=timeout_s)
        _update(job, expect=job.status, enrollment_token=token)
        config = agent_config_toml(
            server_url=str(options.get("server_url") or settings.PUBLIC_BASE_URL),
            token=token_secret,
            state_dir=f"{remote_dir}/state",
            name=str(options.get("name") or ""),
            training_backends=backends,
        )
        ssh.upload(data=config.encode(), remote_path=f"{remote_dir}/agent.toml", mode=0o600)
        _log(
            job,
            "config",
            "ok",
            f"{remote_dir}/agent.toml (token {token.prefix}…, training {', '.join(backends) or 'off'})",
        )

        _advance(job, Status.STARTING)
        out = _checked(
            ssh, f"sh {q(remote_dir + '/install.sh')} start {q(remote_dir)}", step="start", timeout=120
        )
        _log(job, "start", "ok", out.strip()[-300:])

    # The SSH work is over: the credential is wiped now rather than kept while we wait.
    _update(
        job,
        expect=job.status,
        status=Status.WAITING_ENROLLMENT,
        credential_encrypted="",
        locked_until=None,
        enrollment_deadline=timezone.now() + timedelta(seconds=timeout_s),
        steps=[*job.steps, _step_entry(Status.WAITING_ENROLLMENT, "started", f"up to {timeout_s} s")],
    )


def _check_enrollment(job: ProvisioningJob) -> float | None:
    device = (
        Device.objects.filter(enrollment_token_id=job.enrollment_token_id).order_by("enrolled_at").first()
        if job.enrollment_token_id
        else None
    )
    try:
        if device is not None:
            _update(
                job,
                expect=Status.WAITING_ENROLLMENT,
                status=Status.SUCCEEDED,
                device=device,
                finished_at=timezone.now(),
                steps=[*job.steps, _step_entry("enrolled", "ok", f"device {device.name} ({device.pk})")],
            )
            return None
    except _Stopped:
        return None
    if job.enrollment_deadline and timezone.now() > job.enrollment_deadline:
        install_dir = job.host_facts.get("install_dir", "the install directory")
        _fail(
            job,
            code="enrollment_timeout",
            message=f"The agent did not enroll in time; see {install_dir}/agent.log and "
            f"{install_dir}/state/agent.log on the board.",
        )
        return None
    return enrollment_poll_s()


def provisioning_job_run(*, job_id: int) -> float | None:
    """Advance a job as far as it goes now. Returns seconds until it should run again, or None.

    Safe to call twice: only a queued job (or one whose worker died past its lease) is
    claimed, with a conditional UPDATE; a waiting job is only polled.
    """
    job = ProvisioningJob.objects.filter(pk=job_id).first()
    if job is None:
        return None
    if job.status == Status.WAITING_ENROLLMENT:
        return _check_enrollment(job)
    if not _claim(job_id):
        return None
    job.refresh_from_db()
    if not job.credential_encrypted:
        _fail(job, code="no_credential", message="No credential stored; retry the job with one.")
        return None
    try:
        _run_over_ssh(job, credential_decrypt(job.credential_encrypted))
    except _Stopped:
        return None
    except UnknownHostKeyError as exc:
        key = exc.key
        try:
            _update(
                job,
                expect=job.status,
                status=Status.AWAITING_HOST_KEY,
                host_key_type=key.key_type,
                host_key_b64=key.key_b64,
                host_key_fingerprint=key.fingerprint,
                locked_until=None,
                steps=[*job.steps, _step_entry("host_key", "waiting", exc.message)],
            )
        except _Stopped:
            pass
        return None
    except SshError as exc:
        if exc.permanent or job.attempts >= max_attempts():
            suffix = "" if exc.permanent else f" (gave up after {job.attempts} attempts)"
            _fail(job, code=exc.code, message=exc.message + suffix)
            return None
        delay = retry_delay(job.attempts)
        try:
            _update(
                job,
                expect=job.status,
                status=Status.QUEUED,
                locked_until=None,
                next_attempt_at=timezone.now() + timedelta(seconds=delay),
                steps=[
                    *job.steps,
                    _step_entry(
                        job.status, "retry", f"{exc.message}; attempt {job.attempts + 1} in {delay:g} s"
                    ),
                ],
            )
        except _Stopped:
            return None
        return delay
    except ServiceError as exc:
        _fail(job, code=exc.code, message=exc.message)
        return None
    except Exception as exc:
        logger.exception("provisioning job %s crashed", job_id)
        _fail(job, code="internal_error", message=f"Internal error: {type(exc).__name__}: {exc}")
        return None
    return enrollment_poll_s()


def provisioning_jobs_resume() -> list[int]:
    """Periodic safety net: the ids of jobs whose next run was lost, for the task to enqueue.

    Normally every job schedules its own next run; a broker restart without persistence
    can drop that message. This finds queued jobs overdue by a minute, running jobs past
    their lease, and polls waiting jobs directly (a cheap query each). Enqueuing a job
    that is in fact being run is harmless: the claim lets only one run through.
    """
    now = timezone.now()
    overdue = now - timedelta(seconds=60)
    ids = list(
        ProvisioningJob.objects.filter(
            Q(status=Status.QUEUED)
            & (Q(next_attempt_at__lt=overdue) | Q(next_attempt_at=None, created_at__lt=overdue))
            | Q(status__in=ProvisioningJob.RUNNING) & LEASE.expired(now)
        ).values_list("pk", flat=True)
    )
    for job in ProvisioningJob.objects.filter(status=Status.WAITING_ENROLLMENT):
        _check_enrollment(job)
    return ids
