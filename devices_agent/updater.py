"""Desired-state reconciliation: download, verify, install, health-check, activate or roll back.

One call of :meth:`Updater.reconcile` per heartbeat moves the device towards the desired
model version and reports every state to ``deployments/<id>/status``::

    pending -> downloading -> verifying -> installing -> health_check -> active
                                    \\-> failed        (bad digest/signature, too large)
                                                     \\-> rolled_back (health check failed)
    pending -> failed                               (statement refused: replay, expired, downgrade)

Guarantees:

* the download resumes from ``downloads/<sha256>.part`` after a cut connection or an
  agent restart (HTTP ``Range`` with ``If-Range``; ``Content-Range`` is checked; a 200
  answer or a changed ETag restarts from zero);
* nothing is installed before its signed statement verifies under the key pinned at
  enrollment, names the desired version, family, number and kind, has not expired, and
  is not a downgrade (unless a rollback signed for this deployment), and the file's
  SHA-256 is the digest it signs; a refused statement ends the deployment before any
  download, a rejected file is deleted, and the old model is kept either way;
* installation is a directory rename and activation one atomic pointer swap, so the
  model in use is never half written;
* the last good version stays installed; a failed health check swaps back to it;
* a restart between the swap and the verdict swaps back first and redoes the check
  (recorded in ``state.json``), so an unproven model never stays active by accident;
* reports that cannot be delivered are kept and re-sent on the next heartbeat.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devices_agent.client import AgentClient, AuthError, Backoff, ServerError, retry_call
from devices_agent.family import FamilySpec, SpecError
from devices_agent.inference import health_check
from devices_agent.outbox import utc_now_iso
from devices_agent.state import AgentState, InstalledModel
from devices_agent.wire import (
    STATEMENT_FORMAT,
    ArtifactRef,
    ArtifactStatement,
    DeploymentStatusRequest,
    DesiredModel,
    Policy,
    statement_bytes,
)

__all__ = [
    "DownloadError",
    "RefusedError",
    "Updater",
    "VerificationError",
    "download_resumable",
    "installed_number",
    "verify_artifact",
    "verify_statement",
]

log = logging.getLogger("devices_agent.updater")

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
# Deployment ids whose outcome was final here are remembered so a desired state that
# still names them is not retried forever; a bounded list is enough since ids only grow.
_MAX_REMEMBERED = 50


class VerificationError(ValueError):
    """The downloaded artifact's digest or signature is wrong."""


class DownloadError(ValueError):
    """The artifact cannot be downloaded as described (too large, wrong size)."""


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class RefusedError(VerificationError):
    """The artifact's signed statement does not allow installing it here (a replay, a downgrade)."""


def verify_statement(
    ref: ArtifactRef | Mapping[str, Any],
    *,
    public_key: bytes,
    kind: str | None = None,
    version_id: int | None = None,
    family: str | None = None,
    number: int | None = None,
    deployment_id: int | None = None,
    device_id: str | None = None,
    now: float | None = None,
) -> ArtifactStatement:
    """Check the reference's signed statement and that it names what the caller expects.

    The Ed25519 ``statement_signature`` must verify over ``wire.statement_bytes`` of the
    statement under the pinned key; the statement must describe this reference (kind,
    digest, size) and, for each expectation given, name the same ``kind``, ``version_id``,
    ``family`` and ``number``; with ``now`` (unix seconds) it must not have expired. A
    rollback statement must name ``deployment_id`` and ``device_id`` when they are given.
    A reference without a statement (an old server) is refused: its digest signature alone
    could be replayed. Returns the statement; raises :class:`VerificationError` for a bad
    signature and :class:`RefusedError` for a valid one that names something else.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    statement = ref.get("statement")
    signature = ref.get("statement_signature")
    if not isinstance(statement, dict) or not isinstance(signature, str):
        raise VerificationError("the artifact carries no signed statement (a server too old for this agent)")
    try:
        raw_signature = base64.b64decode(signature, validate=True)
        Ed25519PublicKey.from_public_bytes(public_key).verify(raw_signature, statement_bytes(statement))
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise VerificationError(
            "Ed25519 signature of the artifact statement does not verify under the pinned server key"
        ) from exc
    if statement.get("format") != STATEMENT_FORMAT:
        raise RefusedError(f"unknown statement format {statement.get('format')!r}")
    checks: list[tuple[str, Any, Any]] = [
        ("sha256", str(ref.get("sha256", "")).lower(), statement.get("sha256")),
        ("size", ref.get("size"), statement.get("size")),
        ("kind", ref.get("kind"), statement.get("kind")),
    ]
    expected = {"kind": kind, "version_id": version_id, "family": family, "number": number}
    checks += [(name, want, statement.get(name)) for name, want in expected.items() if want is not None]
    if statement.get("rollback"):
        if deployment_id is not None:
            checks.append(("deployment_id", deployment_id, statement.get("deployment_id")))
        if device_id is not None:
            checks.append(("device_id", device_id, statement.get("device_id")))
    for name, want, signed in checks:
        if want != signed:
            raise RefusedError(f"the signed statement names {name} {signed!r}, not {want!r}")
    expires_at = statement.get("expires_at")
    if now is not None and expires_at is not None and float(expires_at) <= now:
        raise RefusedError(f"the signed statement expired at {int(expires_at)} (now {int(now)})")
    return statement  # type: ignore[return-value]


def verify_artifact(
    path: Path,
    *,
    ref: ArtifactRef | Mapping[str, Any],
    public_key: bytes,
    version_id: int | None = None,
    now: float | None = None,
) -> ArtifactStatement:
    """Check the file against the reference's signed statement (:func:`verify_statement`).

    The file's SHA-256 must be the digest the statement signs, so the bytes are bound to
    the version, family and kind the server named. Raises :class:`VerificationError`.
    """
    statement = verify_statement(
        ref, public_key=public_key, kind=str(ref.get("kind", "")), version_id=version_id, now=now
    )
    actual = sha256_file(path)
    if actual != statement["sha256"]:
        raise VerificationError(f"SHA-256 mismatch: expected {statement['sha256']}, got {actual}")
    return statement


def installed_number(model: InstalledModel, family: str) -> int | None:
    """The registry number of an installed model of ``family``, or None when not known.

    Models installed since statements exist record the signed number; older installs
    have only their label (``<family>:v<number>``), which is read as a fallback.
    """
    if model.meta.get("family") != family:
        return None
    number = model.meta.get("number")
    if isinstance(number, int):
        return number
    match = re.fullmatch(re.escape(family) + r":v(\d+)", str(model.meta.get("label", "")))
    return int(match.group(1)) if match else None


def _truncate(part: Path) -> None:
    with open(part, "wb"):
        pass


def download_resumable(
    *,
    client: AgentClient,
    url: str,
    part: Path,
    expected_size: int,
) -> Path:
    """Fetch ``url`` into ``part``, resuming from the bytes already there.

    One attempt: raises a retryable :class:`ServerError` when the connection is cut (the
    bytes received so far stay in ``part`` for the next attempt) or when the server's
    answer forces a restart from zero; :class:`DownloadError` when the server sends more
    than ``expected_size``. The ETag of the first answer is stored next to the part file
    and sent as ``If-Range``, so a changed artifact is never spliced onto an old prefix.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    etag_path = part.with_name(part.name + ".etag")
    offset = part.stat().st_size if part.exists() else 0
    stored_etag = etag_path.read_text().strip() if etag_path.exists() else ""
    if offset > expected_size:
        _truncate(part)
        offset = 0
    if offset == expected_size and expected_size > 0:
        return part
    headers: dict[str, str] = {}
    if offset:
        headers["Range"] = f"bytes={offset}-"
        if stored_etag:
            headers["If-Range"] = stored_etag
    with client.stream(url, headers=headers) as response:
        etag = response.headers.get("ETag", "")
        if response.status_code == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            total_ok = match is not None and match.group(3) in ("*", str(expected_size))
            if match is None or int(match.group(1)) != offset or not total_ok:
                _truncate(part)
                etag_path.unlink(missing_ok=True)
                raise ServerError(
                    f"unexpected Content-Range {response.headers.get('Content-Range')!r} "
                    f"for a resume at {offset}; restarting from zero",
                    retryable=True,
                )
            if stored_etag and etag and etag != stored_etag:
                _truncate(part)
                etag_path.unlink(missing_ok=True)
                raise ServerError("artifact changed (ETag) during the download; restarting", retryable=True)
            mode = "ab"
        elif response.status_code == 200:
            # The server ignored the range (or If-Range saw a new ETag): start over.
            offset = 0
            mode = "wb"
        else:
            raise ServerError(f"unexpected status {response.status_code} for {url}", retryable=True)
        if etag:
            etag_path.write_text(etag)
        written = offset
        with open(part, mode) as fh:
            # No fixed chunk size: httpx would hold up to a chunk in its buffer, and those
            # bytes would be lost when the connection is cut; this writes what arrived.
            for chunk in response.iter_bytes():
                written += len(chunk)
                if written > expected_size:
                    fh.close()
                    part.unlink(missing_ok=True)
                    etag_path.unlink(missing_ok=True)
                    raise DownloadError(f"server sent more than the announced {expected_size} bytes")
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
    if written < expected_size:
        raise ServerError(f"connection ended at {written} of {expected_size} bytes", retryable=True)
    return part


@dataclass(frozen=True)
class Outcome:
    """What one reconcile step did (for logs, tests and the simulator)."""

    action: str  # idle | current | deferred | retry | active | failed | rolled_back | skipped
    message: str = ""


class Updater:
    """Brings the device to its desired model version; see the module docstring."""

    def __init__(
        self,
        *,
        state: AgentState,
        client: AgentClient,
        public_key: bytes,
        on_activate: Callable[[InstalledModel | None], None] | None = None,
        download_attempts: int = 4,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
        health_runs: int = 20,
        inference_delay_ms: float = 0.0,
        keep_versions: int = 2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state = state
        self.client = client
        self.public_key = public_key
        self.on_activate = on_activate
        self.download_attempts = download_attempts
        self.backoff = backoff or Backoff(base_s=0.5, cap_s=10.0)
        self.sleep = sleep
        self.health_runs = health_runs
        self.inference_delay_ms = inference_delay_ms
        self.keep_versions = keep_versions
        # Unix seconds, against which statements' expiry is checked (the board's clock).
        self.clock = clock

    # --- reporting -------------------------------------------------------------------
    def last_report(self) -> dict[str, Any] | None:
        """``{"id", "state"}`` of the latest deployment report, for the heartbeat."""
        value = self.state.load().get("deployment_report")
        return value if isinstance(value, dict) else None

    def report(self, deployment_id: int | None, state: str, message: str = "", **detail: Any) -> None:
        """Report a deployment state; keep it for the next heartbeat when the server is unreachable."""
        if deployment_id is None:
            return
        body: DeploymentStatusRequest = {"state": state, "reported_at": utc_now_iso()}  # type: ignore[typeddict-item]
        if message:
            body["message"] = message[:1000]
        if detail:
            body["detail"] = detail
        self.state.update(deployment_report={"id": int(deployment_id), "state": state})
        log.info("deployment %s: %s %s", deployment_id, state, message)
        try:
            self.client.report_deployment(deployment_id, body)
        except ServerError as exc:
            if exc.retryable:
                queued = list(self.state.load().get("unsent_reports", []))
                queued.append({"id": int(deployment_id), "body": dict(body)})
                self.state.update(unsent_reports=queued[-_MAX_REMEMBERED:])
            else:
                # A refusal (e.g. the server superseded the deployment) will not change on
                # a retry; the heartbeat still carries the latest state.
                log.warning("deployment %s report %s refused: %s", deployment_id, state, exc)

    def flush_reports(self) -> None:
        """Re-send reports that could not be delivered earlier, oldest first."""
        queued = list(self.state.load().get("unsent_reports", []))
        while queued:
            item = queued[0]
            try:
                self.client.report_deployment(int(item["id"]), item["body"])
            except ServerError as exc:
                if exc.retryable:
                    break
                log.warning("dropping refused deployment report %s: %s", item, exc)
            queued.pop(0)
            self.state.update(unsent_reports=queued or None)

    def _remember_finished(self, deployment_id: int | None, state: str) -> None:
        if deployment_id is None:
            return
        finished = dict(self.state.load().get("finished_deployments", {}))
        finished[str(deployment_id)] = state
        keep = dict(sorted(finished.items(), key=lambda kv: int(kv[0]))[-_MAX_REMEMBERED:])
        self.state.update(finished_deployments=keep, deployment=None)

    def _finished_state(self, deployment_id: int | None) -> str | None:
        if deployment_id is None:
            return None
        value = self.state.load().get("finished_deployments", {}).get(str(deployment_id))
        return str(value) if value is not None else None

    # --- recovery --------------------------------------------------------------------
    def recover(self) -> None:
        """After a restart: undo a swap whose health check never finished."""
        dep = self.state.load().get("deployment")
        if not isinstance(dep, dict) or dep.get("stage") != "health_check":
            return
        version_id = int(dep["version_id"])
        if self.state.current_version_id() == version_id:
            previous = dep.get("previous_version_id")
            target = int(previous) if previous is not None and self.state.installed(int(previous)) else None
            self.state.set_current(target, previous_version_id=None)
            log.warning("restart during the health check of version %s: back to %s", version_id, target)
        self.state.update(deployment={**dep, "stage": "installed"})

    # --- reconciliation --------------------------------------------------------------
    def reconcile(self, desired: DesiredModel | None, policy: Policy) -> Outcome:
        """One step towards ``desired``; returns what happened. Never raises ServerError."""
        if desired is None:
            return Outcome("idle")
        version_id = int(desired["version_id"])
        deployment_id = desired.get("deployment_id")
        finished = self._finished_state(deployment_id)
        current = self.state.current_version_id()
        if current == version_id and self.state.installed(version_id) is not None:
            if deployment_id is not None and finished is None:
                # Installed before the report got through (or installed by an earlier
                # deployment of the same version): say so once.
                self.report(deployment_id, "active", "already running this version")
                self._remember_finished(deployment_id, "active")
            return Outcome("current")
        if finished is not None:
            return Outcome("skipped", f"deployment {deployment_id} already ended {finished}")
        try:
            return self._apply(desired, policy)
        except AuthError:
            raise
        except ServerError as exc:
            log.warning("deployment %s: will retry: %s", deployment_id, exc)
            return Outcome("retry", str(exc))

    def _refusal(self, desired: DesiredModel) -> str | None:
        """Why the desired model's signed statement does not allow installing it, or None.

        The statement must verify and name the desired version, family, number and kind
        (a replayed artifact of another version fails here), must not have expired, and
        must not take the board to an older version of the family it runs unless it is a
        rollback statement made for this deployment and this device.
        """
        deployment_id = desired.get("deployment_id")
        creds = self.state.credentials()
        number = desired.get("number")
        try:
            statement = verify_statement(
                desired["artifact"],
                public_key=self.public_key,
                kind="onnx",
                version_id=int(desired["version_id"]),
                family=str(desired.get("family", "")),
                number=int(number) if number is not None else None,
                deployment_id=int(deployment_id) if deployment_id is not None else None,
                device_id=creds.device_id if creds is not None else None,
                now=self.clock(),
            )
        except VerificationError as exc:
            return str(exc)
        current = self.state.current()
        running = installed_number(current, statement["family"]) if current is not None else None
        # A rollback statement allows an older version only for the deployment and the
        # device it was signed for (verify_statement compared them; here none may be missing).
        rollback = (
            bool(desired.get("rollback"))
            and statement["rollback"]
            and deployment_id is not None
            and statement.get("deployment_id") == int(deployment_id)
            and creds is not None
            and statement.get("device_id") == creds.device_id
        )
        if running is not None and statement["number"] < running and not rollback:
            return (
                f"downgrade refused: {statement['family']} v{statement['number']} is older than "
                f"the running v{running}, and the deployment is not a signed rollback"
            )
        return None

    def _apply(self, desired: DesiredModel, policy: Policy) -> Outcome:
        version_id = int(desired["version_id"])
        deployment_id = desired.get("deployment_id")
        artifact = desired["artifact"]
        sha256 = artifact["sha256"].lower()
        # Before anything is downloaded (or an installed copy re-activated): a statement
        # that does not allow this install ends the deployment; the board keeps its model.
        refusal = self._refusal(desired)
        if refusal is not None:
            return self._fail(deployment_id, f"artifact refused: {refusal}", detail={"refused": True})
        dep = self.state.load().get("deployment")
        if not isinstance(dep, dict) or dep.get("id") != deployment_id or dep.get("version_id") != version_id:
            dep = {"id": deployment_id, "version_id": version_id, "sha256": sha256, "stage": "new"}
            self.state.update(deployment=dep)

        installed = self.state.installed(version_id)
        if installed is None or installed.sha256 != sha256:
            # The size limit first: the server's download_allowed is also false for a
            # too-large artifact, and that must fail clearly rather than wait forever.
            max_bytes = policy.get("max_download_bytes")
            if max_bytes is not None and int(artifact["size"]) > int(max_bytes):
                reason = f"artifact is {artifact['size']} bytes, over the policy limit of {max_bytes} bytes"
                return self._fail(
                    deployment_id, reason, detail={"size": artifact["size"], "limit": max_bytes}
                )
            if policy.get("download_allowed") is False or policy.get("in_maintenance_window") is False:
                if dep.get("stage") != "deferred":
                    self.report(deployment_id, "pending", "waiting for the maintenance window")
                    self.state.update(deployment={**dep, "stage": "deferred"})
                return Outcome("deferred", "outside the maintenance window")
            installed_or_outcome = self._download_verify_install(desired, dep)
            if isinstance(installed_or_outcome, Outcome):
                return installed_or_outcome
            installed = installed_or_outcome
        return self._activate(desired, installed, policy)

    def _download_verify_install(
        self, desired: DesiredModel, dep: dict[str, Any]
    ) -> InstalledModel | Outcome:
        version_id = int(desired["version_id"])
        deployment_id = desired.get("deployment_id")
        artifact = desired["artifact"]
        sha256 = artifact["sha256"].lower()
        part = self.state.part_path(sha256)
        if dep.get("stage") != "downloading":
            self.report(deployment_id, "downloading", resume_from=part.stat().st_size if part.exists() else 0)
            dep = {**dep, "stage": "downloading"}
            self.state.update(deployment=dep)
        try:
            retry_call(
                lambda: download_resumable(
                    client=self.client, url=artifact["url"], part=part, expected_size=int(artifact["size"])
                ),
                backoff=self.backoff,
                max_attempts=self.download_attempts,
                sleep=self.sleep,
            )
        except DownloadError as exc:
            return self._fail(deployment_id, str(exc))
        except ServerError as exc:
            if exc.retryable:
                raise
            # 404/410: the artifact is gone on the server; nothing to retry.
            part.unlink(missing_ok=True)
            return self._fail(deployment_id, f"artifact download refused: {exc}")
        self.report(deployment_id, "verifying")
        try:
            statement = verify_artifact(part, ref=artifact, public_key=self.public_key, version_id=version_id)
        except VerificationError as exc:
            part.unlink(missing_ok=True)
            part.with_name(part.name + ".etag").unlink(missing_ok=True)
            return self._fail(deployment_id, f"artifact rejected: {exc}")
        self.report(deployment_id, "installing")
        meta = {
            "version_id": version_id,
            "label": desired.get("label", ""),
            "family": desired.get("family", ""),
            # The signed registry number: what a later update is compared with (downgrades).
            "number": statement["number"],
            "sha256": sha256,
            "size": int(artifact["size"]),
            # The contract and the learning artifacts travel with the installed model, so
            # the local API, training and personalisation work from the state directory.
            "spec": desired.get("spec"),
            "program": desired.get("program"),
            "weights": desired.get("weights"),
            "head": list(desired.get("head") or []),
            "installed_at": utc_now_iso(),
        }
        installed = self.state.install(version_id=version_id, source=part, meta=meta)
        part.with_name(part.name + ".etag").unlink(missing_ok=True)
        self.state.update(deployment={**dep, "stage": "installed"})
        return installed

    def _expected(self, desired: DesiredModel) -> tuple[list[int] | None, int | None, str]:
        """The input shape, outputs per example and input dtype the family declares."""
        raw = desired.get("spec")
        if not raw:
            return None, None, "float32"
        try:
            spec = FamilySpec.from_dict(raw)
        except SpecError:
            return None, None, "float32"
        return list(spec.input_shape), spec.outputs, spec.input_dtype

    def _activate(self, desired: DesiredModel, installed: InstalledModel, policy: Policy) -> Outcome:
        version_id = int(desired["version_id"])
        deployment_id = desired.get("deployment_id")
        previous = self.state.current_version_id()
        if previous == version_id:
            previous = self.state.last_good_version_id()
        dep = {
            "id": deployment_id,
            "version_id": version_id,
            "sha256": installed.sha256,
            "stage": "health_check",
            "previous_version_id": previous,
        }
        # Recorded before the swap: a restart from here on swaps back (see recover()).
        self.state.update(deployment=dep)
        self.state.set_current(version_id, previous_version_id=previous)
        self.report(deployment_id, "health_check")
        budget = policy.get("health_latency_budget_ms")
        input_shape, outputs, input_dtype = self._expected(desired)
        result = health_check(
            model=installed.path,
            input_shape=input_shape,
            num_classes=outputs,
            input_dtype=input_dtype,
            latency_budget_ms=float(budget) if budget is not None else None,
            runs=self.health_runs,
            extra_delay_ms=self.inference_delay_ms,
        )
        if not result.ok:
            back_to = previous if previous is not None and self.state.installed(previous) else None
            self.state.set_current(back_to, previous_version_id=None)
            # The failed version is removed so a later deployment of it downloads afresh.
            shutil.rmtree(self.state.model_dir(version_id), ignore_errors=True)
            if self.on_activate is not None:
                self.on_activate(self.state.current())
            state = "rolled_back" if back_to is not None else "failed"
            self.report(
                deployment_id,
                state,
                f"health check failed: {result.reason}",
                health=result.detail(),
                restored_version_id=back_to,
            )
            self._remember_finished(deployment_id, state)
            return Outcome(state, result.reason)
        self.state.update(last_good_version_id=version_id)
        if self.on_activate is not None:
            self.on_activate(self.state.current())
        self.report(deployment_id, "active", health=result.detail(), previous_version_id=previous)
        self._remember_finished(deployment_id, "active")
        self._prune(keep={version_id, *([previous] if previous is not None else [])})
        return Outcome("active")

    def _fail(
        self, deployment_id: int | None, reason: str, *, detail: dict[str, Any] | None = None
    ) -> Outcome:
        self.report(deployment_id, "failed", reason, **(detail or {}))
        self._remember_finished(deployment_id, "failed")
        return Outcome("failed", reason)

    def _prune(self, *, keep: set[int]) -> None:
        versions = [v for v in self.state.installed_versions() if v not in keep]
        # Newest first beyond the ones we must keep, up to keep_versions in total.
        room = max(0, self.keep_versions - len(keep))
        for version_id in sorted(versions, reverse=True)[room:]:
            try:
                self.state.remove_version(version_id)
            except ValueError:
                pass
