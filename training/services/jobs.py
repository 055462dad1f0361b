"""Federated jobs: configuration checks, creation, the operator's transitions, how a job
ends, and the retraining job a drift flag starts.

Every transition is a conditional update on the job's status, so a repeated request or
a task delivered twice changes nothing the second time. Rounds are opened by the
``training.round_open`` task, sent after the transition commits.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from core.api import ConflictError, NotFoundError, ServiceError
from core.audit.services import audit_record
from core.dispatch import enqueue_on_commit
from core.events import emit
from devices_agent.wire import TRAINING_BACKENDS
from fleet.models import Device, DeviceGroup
from fleet.selectors.devices import group_members
from models_registry.models import Artifact, ModelFamily, ModelVersion
from training.aggregation import AGGREGATORS, Privacy, make_aggregator
from training.models import FederatedJob, FederatedRound

CODECS = ("none", "fp16", "int8", "topk")
OPTIMIZERS = ("sgd", "adam")
# Set by the server for every round, never part of a job's configuration.
RESERVED_STRATEGY_PARAMS = ("privacy", "state")
# A retrain is a short job: a handful of rounds from the flagged version, enough to adapt
# to the new inputs without tying the group up for long.
RETRAIN_ROUNDS = 3
ACTIVE = (FederatedJob.Status.DRAFT, FederatedJob.Status.RUNNING, FederatedJob.Status.PAUSED)

JOB_FIELDS = (
    "name",
    "rounds",
    "clients_fraction",
    "min_clients",
    "require_online",
    "min_local_examples",
    "max_examples_per_update",
    "local_epochs",
    "batch_size",
    "optimizer",
    "lr",
    "prox_mu",
    "strategy",
    "strategy_params",
    "clip_norm",
    "noise_multiplier",
    "dp_delta",
    "norm_slack",
    "max_update_norm",
    "codec",
    "topk_fraction",
    "backends",
    "round_deadline_s",
    "quorum",
    "max_consecutive_failures",
    "seed",
)


def job_privacy(*, job: FederatedJob, noise_key: bytes | None = None) -> Privacy | None:
    """What the aggregator does for privacy (None without a clip norm).

    ``noise_key`` is the round's secret (see ``training.services.aggregation``); no job
    field determines the noise.
    """
    if job.clip_norm is None:
        return None
    return Privacy(clip_norm=job.clip_norm, noise_multiplier=job.noise_multiplier, key=noise_key)


def _validate_strategy(job: FederatedJob, errors: dict[str, str]) -> None:
    if not isinstance(job.strategy_params, dict):
        errors["strategy_params"] = "must be an object"
        return
    if job.strategy not in AGGREGATORS:
        return
    reserved = sorted(set(RESERVED_STRATEGY_PARAMS) & set(job.strategy_params))
    if reserved:
        errors["strategy_params"] = f"{reserved} are set by the server, not by the job"
        return
    probe = {"w": np.zeros(1, np.float32)}
    try:
        make_aggregator(job.strategy, global_weights=probe, **job.strategy_params)
    except (ValueError, TypeError) as exc:
        errors["strategy_params"] = str(exc)
        return
    if job.noise_multiplier > 0 and "noise_multiplier" not in errors and "clip_norm" not in errors:
        # The strategy says whether it can add the noise (order statistics cannot).
        try:
            make_aggregator(
                job.strategy, global_weights=probe, privacy=job_privacy(job=job), **job.strategy_params
            )
        except ValueError as exc:
            errors["noise_multiplier"] = str(exc)


def _validate_job(job: FederatedJob) -> None:
    errors: dict[str, str] = {}
    if job.strategy not in AGGREGATORS:
        errors["strategy"] = f"must be one of {list(AGGREGATORS)}"
    if job.codec not in CODECS:
        errors["codec"] = f"must be one of {list(CODECS)}"
    if job.optimizer not in OPTIMIZERS:
        errors["optimizer"] = f"must be one of {list(OPTIMIZERS)}"
    if job.rounds < 1:
        errors["rounds"] = "must be at least 1"
    if not 0 < job.clients_fraction <= 1:
        errors["clients_fraction"] = "must be in (0, 1]"
    if job.min_clients < 1:
        errors["min_clients"] = "must be at least 1"
    if job.quorum < 1:
        errors["quorum"] = "must be at least 1"
    if job.local_epochs < 1 or job.batch_size < 1:
        errors["local_epochs"] = "local_epochs and batch_size must be at least 1"
    if not (job.lr > 0 and math.isfinite(job.lr)):
        errors["lr"] = "must be positive"
    if job.prox_mu < 0:
        errors["prox_mu"] = "must be >= 0"
    if job.clip_norm is not None and not (job.clip_norm > 0 and math.isfinite(job.clip_norm)):
        errors["clip_norm"] = "must be positive"
    if not (job.noise_multiplier >= 0 and math.isfinite(job.noise_multiplier)):
        errors["noise_multiplier"] = "must be >= 0"
    if job.noise_multiplier > 0 and job.clip_norm is None:
        errors["noise_multiplier"] = "noise needs clip_norm (the sensitivity of each update)"
    if not 0 < job.dp_delta < 1:
        errors["dp_delta"] = "must be in (0, 1)"
    if job.max_examples_per_update < 1:
        errors["max_examples_per_update"] = "must be at least 1"
    if job.norm_slack < 1:
        errors["norm_slack"] = "must be >= 1"
    if job.max_update_norm is not None and not job.max_update_norm > 0:
        errors["max_update_norm"] = "must be positive"
    if not 0 < job.topk_fraction <= 1:
        errors["topk_fraction"] = "must be in (0, 1]"
    if job.round_deadline_s < 1:
        errors["round_deadline_s"] = "must be at least 1"
    if job.max_consecutive_failures < 1:
        errors["max_consecutive_failures"] = "must be at least 1"
    if job.base_version.family_id != job.family_id:
        errors["base_version"] = "must belong to the job's family"
    else:
        kinds = set(Artifact.objects.filter(version=job.base_version).values_list("kind", flat=True))
        missing = [
            k for k in (Artifact.Kind.WEIGHTS, Artifact.Kind.PROGRAM, Artifact.Kind.ONNX) if k not in kinds
        ]
        if missing:
            errors["base_version"] = (
                f"has no {' or '.join(missing)} artifact; boards train the program from the weights "
                "and serve the ONNX graph (devices_agent.program.make_bundle writes all three)"
            )
    if not isinstance(job.backends, list) or not all(b in TRAINING_BACKENDS for b in job.backends):
        errors["backends"] = f"must be a list of {list(TRAINING_BACKENDS)}"
    elif job.backends == ["ort"] and job.prox_mu > 0:
        # ORT boards train the graph they were given; FedProx's proximal term is not in it.
        errors["backends"] = "FedProx (prox_mu > 0) is trained by torch boards only; accept torch too"
    _validate_strategy(job, errors)
    if errors:
        field, message = next(iter(errors.items()))
        raise ServiceError(f"{field}: {message}", code="validation_error", details=errors)


def _request_ort_artifacts(*, job: FederatedJob, actor: Any) -> None:
    """Boards without PyTorch need the base version's ORT artifacts: ask for them unless they
    are built, being built, or known not to be possible (a failed build is tried again)."""
    from models_registry import ort_training
    from models_registry.jobs import ort_training_request

    if ort_training.ort_training_status(job.base_version) in ("", ort_training.FAILED):
        ort_training_request(version=job.base_version, actor=actor)


@transaction.atomic
def job_create(
    *,
    actor: Any,
    family: ModelFamily,
    base_version: ModelVersion,
    target_group: DeviceGroup,
    remote_addr: str | None = None,
    **fields: Any,
) -> FederatedJob:
    """Create a draft job after validating its configuration (see ``JOB_FIELDS``)."""
    unknown = set(fields) - set(JOB_FIELDS)
    if unknown:
        raise ServiceError(f"unknown fields {sorted(unknown)}", code="validation_error")
    job = FederatedJob(
        family=family,
        base_version=base_version,
        target_group=target_group,
        created_by=actor if getattr(actor, "is_authenticated", False) else None,
        **fields,
    )
    if not job.name:
        job.name = f"{family.name} federated"
    _validate_job(job)
    job.save()
    if settings.ORT_TRAINING_AUTO and "ort" in (job.backends or TRAINING_BACKENDS):
        _request_ort_artifacts(job=job, actor=actor)
    audit_record(
        actor=actor,
        action="federated_job.create",
        target=job,
        data={k: getattr(job, k) for k in JOB_FIELDS},
        remote_addr=remote_addr,
    )
    return job


def _transition(
    *, job_id: int, actor: Any, action: str, allowed: tuple[str, ...], to: str, remote_addr: str | None
) -> FederatedJob:
    job = FederatedJob.objects.filter(id=job_id).first()
    if job is None:
        raise NotFoundError("No such federated job.", code="not_found")
    updates: dict[str, Any] = {"status": to}
    if to == FederatedJob.Status.RUNNING and job.started_at is None:
        updates["started_at"] = timezone.now()
    if to == FederatedJob.Status.CANCELLED:
        updates["finished_at"] = timezone.now()
    if FederatedJob.objects.filter(id=job_id, status__in=allowed).update(**updates) != 1:
        raise ConflictError(
            f"Cannot {action} a job that is {job.status}.",
            code="invalid_state",
            details={"status": job.status},
        )
    job.refresh_from_db()
    audit_record(actor=actor, action=f"federated_job.{action}", target=job, remote_addr=remote_addr)
    emit("federated_job.status", {"job": job.pk, "status": job.status})
    return job


@transaction.atomic
def job_start(*, job_id: int, actor: Any, remote_addr: str | None = None) -> FederatedJob:
    """Start a draft job: the first round opens on a worker."""
    job = _transition(
        job_id=job_id,
        actor=actor,
        action="start",
        allowed=(FederatedJob.Status.DRAFT,),
        to=FederatedJob.Status.RUNNING,
        remote_addr=remote_addr,
    )
    enqueue_on_commit("training.round_open", job.pk)
    return job


@transaction.atomic
def job_pause(*, job_id: int, actor: Any, remote_addr: str | None = None) -> FederatedJob:
    """Pause a running job: the current round finishes, no new round opens."""
    return _transition(
        job_id=job_id,
        actor=actor,
        action="pause",
        allowed=(FederatedJob.Status.RUNNING,),
        to=FederatedJob.Status.PAUSED,
        remote_addr=remote_addr,
    )


@transaction.atomic
def job_resume(*, job_id: int, actor: Any, remote_addr: str | None = None) -> FederatedJob:
    """Resume a paused job: the next round opens (or the open one carries on)."""
    job = _transition(
        job_id=job_id,
        actor=actor,
        action="resume",
        allowed=(FederatedJob.Status.PAUSED,),
        to=FederatedJob.Status.RUNNING,
        remote_addr=remote_addr,
    )
    enqueue_on_commit("training.round_open", job.pk)
    return job


@transaction.atomic
def job_cancel(*, job_id: int, actor: Any, remote_addr: str | None = None) -> FederatedJob:
    """Cancel a job; a round still collecting is marked failed."""
    job = _transition(
        job_id=job_id,
        actor=actor,
        action="cancel",
        allowed=ACTIVE,
        to=FederatedJob.Status.CANCELLED,
        remote_addr=remote_addr,
    )
    FederatedRound.objects.filter(
        job=job, status__in=(FederatedRound.Status.PENDING, FederatedRound.Status.COLLECTING)
    ).update(status=FederatedRound.Status.FAILED, failure_reason="job cancelled", finished_at=timezone.now())
    return job


def job_succeed(*, job: FederatedJob) -> None:
    """The job ran its last round (called by ``round_open`` when there is no next one)."""
    if FederatedJob.objects.filter(id=job.pk, status=FederatedJob.Status.RUNNING).update(
        status=FederatedJob.Status.SUCCEEDED, finished_at=timezone.now()
    ):
        audit_record(actor=None, action="federated_job.succeeded", target=job)
        emit("federated_job.status", {"job": job.pk, "status": FederatedJob.Status.SUCCEEDED})


def job_round_failed(*, job: FederatedJob, rnd: FederatedRound, reason: str) -> None:
    """Count a failed round: the job fails after ``max_consecutive_failures`` in a row,
    otherwise the next round opens."""
    FederatedJob.objects.filter(id=job.pk).update(consecutive_failures=F("consecutive_failures") + 1)
    job.refresh_from_db()
    emit(
        "federated_round.status",
        {"job": job.pk, "round": rnd.number, "status": FederatedRound.Status.FAILED, "reason": reason},
    )
    if job.consecutive_failures >= job.max_consecutive_failures:
        message = f"{job.consecutive_failures} consecutive rounds failed; last: {reason}"
        if FederatedJob.objects.filter(id=job.pk, status=FederatedJob.Status.RUNNING).update(
            status=FederatedJob.Status.FAILED, error=message, finished_at=timezone.now()
        ):
            audit_record(actor=None, action="federated_job.failed", target=job, data={"error": message})
            emit("federated_job.status", {"job": job.pk, "status": FederatedJob.Status.FAILED})
        return
    enqueue_on_commit("training.round_open", job.pk)


# --------------------------------------------------------------------------- drift


def group_running_most(version: ModelVersion) -> tuple[DeviceGroup | None, int]:
    # Members are static devices plus those matching the group's tag selector (as a job
    # selects them); groups are few and this runs once per flag, so one count per group.
    top: DeviceGroup | None = None
    top_running = 0
    for group in DeviceGroup.objects.order_by("pk"):
        running = (
            group_members(group=group)
            .filter(running_version=version)
            .exclude(status=Device.Status.DECOMMISSIONED)
            .count()
        )
        if running > top_running:
            top, top_running = group, running
    return top, top_running


def _retrain_start(*, version: ModelVersion) -> int | None:
    if FederatedJob.objects.filter(family_id=version.family_id, status__in=ACTIVE).exists():
        return None
    group, running = group_running_most(version)
    if group is None:
        return None
    # Quorum and minimum clients cannot exceed the devices that can take part.
    clients = max(1, min(2, running))
    try:
        job = job_create(
            actor=None,
            family=version.family,
            base_version=version,
            target_group=group,
            name=f"{version.family.name} retrain after drift (v{version.number})",
            rounds=RETRAIN_ROUNDS,
            min_clients=clients,
            quorum=clients,
        )
    except ServiceError:
        return None  # e.g. the version has no weights to start from
    job_start(job_id=job.pk, actor=None)
    return int(job.pk)


@transaction.atomic
def job_retrain_for_flag(*, version_id: int) -> int | None:
    """Start a short federated job from a version flagged for drift (``model.flagged``).

    The job starts from the version, on the group running it most, for
    ``RETRAIN_ROUNDS`` rounds. Its id (or None: no group runs the version, a job of the
    family is already draft, running or paused, or the version cannot seed a job) is
    stored as ``metrics["flagged"]["retrain_job"]``; a flag that has that key was
    handled already, so one flag starts at most one job.
    """
    version = ModelVersion.objects.select_for_update().select_related("family").filter(pk=version_id).first()
    if version is None:
        return None
    flag = (version.metrics or {}).get("flagged")
    if not isinstance(flag, dict):
        return None
    if "retrain_job" in flag:
        handled: int | None = flag["retrain_job"]
        return handled
    job_id = _retrain_start(version=version)
    version.metrics = {**version.metrics, "flagged": {**flag, "retrain_job": job_id}}
    version.save(update_fields=["metrics"])
    return job_id
