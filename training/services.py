"""Writes of the training app: jobs, rounds, client updates, aggregation.

Every transition is a conditional update on the row's status, so a task delivered twice
(acks_late re-delivers after a crash) is a no-op the second time, and Celery tasks are
enqueued only after the transaction that made their rows visible commits.

Round lifecycle: ``pending`` (waiting for enough eligible devices) -> ``collecting``
(devices fetch the task and upload deltas) -> ``aggregating`` (closed: every selected
device answered, or the deadline passed with at least ``quorum`` accepted updates) ->
``evaluating`` -> ``done`` (a new ModelVersion), or ``failed`` (too few updates at the
deadline, or aggregation failed). After ``max_consecutive_failures`` failed rounds in a
row the job fails; otherwise the next round opens.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from core.api import ConflictError, NotFoundError, ServiceError
from core.audit.services import audit_record
from devices_agent.codecs import WireError, decode_delta, decode_tensors, encode_tensors, l2_norm
from fleet.models import Device, DeviceGroup
from models_registry.models import Artifact, ModelFamily, ModelVersion
from training import notify, selectors, storage
from training.aggregation import (
    AGGREGATORS,
    SafetensorsFileSource,
    UpdateFileReader,
    WeightedMeanAggregator,
    make_aggregator,
    partial_from_bytes,
    partial_to_bytes,
    state_from_bytes,
    state_to_bytes,
)
from training.aggregation.privacy import add_gaussian_noise, clip_update, epsilon_for
from training.aggregation.server_opt import ServerOptAggregator
from training.models import ClientUpdate, FederatedJob, FederatedRound, PartialAggregate

logger = logging.getLogger(__name__)

Weights = dict[str, npt.NDArray[np.float32]]

CODECS = ("none", "fp16", "int8", "topk")
OPTIMIZERS = ("sgd", "adam")
MERGEABLE = ("fedavg", "fedprox", "fedadam", "fedyogi")
MAX_METRICS_JSON = 4096

JOB_FIELDS = (
    "name",
    "rounds",
    "clients_fraction",
    "min_clients",
    "require_online",
    "min_local_examples",
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
    "round_deadline_s",
    "quorum",
    "max_consecutive_failures",
    "export_onnx",
    "seed",
)


def _setting(name: str, default: Any) -> Any:
    return getattr(settings, name, default)


def _emit(event: str, data: dict[str, Any]) -> None:
    """Publish a webhook event (delivered after the current transaction commits)."""
    from core.events import emit

    emit(event, data)


def _enqueue(task_name: str, *args: Any, countdown: float | None = None) -> None:
    """Send a Celery task by name once the current transaction commits."""

    def send() -> None:
        from config.celery import app

        app.send_task(task_name, args=list(args), countdown=countdown)

    transaction.on_commit(send)


# --------------------------------------------------------------------------- jobs


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
    if job.clip_norm is not None and not job.clip_norm > 0:
        errors["clip_norm"] = "must be positive"
    if job.noise_multiplier < 0:
        errors["noise_multiplier"] = "must be >= 0"
    if job.noise_multiplier > 0 and job.clip_norm is None:
        errors["noise_multiplier"] = "noise needs clip_norm (the sensitivity of each update)"
    if not 0 < job.dp_delta < 1:
        errors["dp_delta"] = "must be in (0, 1)"
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
    elif not Artifact.objects.filter(version=job.base_version, kind=Artifact.Kind.WEIGHTS).exists():
        errors["base_version"] = "has no weights artifact to start from"
    if not isinstance(job.strategy_params, dict):
        errors["strategy_params"] = "must be an object"
    elif job.strategy in AGGREGATORS:
        try:
            make_aggregator(
                job.strategy, global_weights={"w": np.zeros(1, np.float32)}, **job.strategy_params
            )
        except (ValueError, TypeError) as exc:
            errors["strategy_params"] = str(exc)
    if errors:
        field, message = next(iter(errors.items()))
        raise ServiceError(f"{field}: {message}", code="validation_error", details=errors)


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
    _emit("federated_job.status", {"job": job.pk, "status": job.status})
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
    _enqueue("training.round_open", job.pk)
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
    _enqueue("training.round_open", job.pk)
    return job


@transaction.atomic
def job_cancel(*, job_id: int, actor: Any, remote_addr: str | None = None) -> FederatedJob:
    """Cancel a job; a round still collecting is marked failed."""
    job = _transition(
        job_id=job_id,
        actor=actor,
        action="cancel",
        allowed=(FederatedJob.Status.DRAFT, FederatedJob.Status.RUNNING, FederatedJob.Status.PAUSED),
        to=FederatedJob.Status.CANCELLED,
        remote_addr=remote_addr,
    )
    FederatedRound.objects.filter(
        job=job, status__in=(FederatedRound.Status.PENDING, FederatedRound.Status.COLLECTING)
    ).update(status=FederatedRound.Status.FAILED, failure_reason="job cancelled", finished_at=timezone.now())
    return job


# --------------------------------------------------------------------------- rounds


def _weights_of(version: ModelVersion) -> bytes:
    artifact = Artifact.objects.get(version=version, kind=Artifact.Kind.WEIGHTS)
    with artifact.file.open("rb") as handle:
        data: bytes = handle.read()
    return data


def _select(*, job: FederatedJob, number: int) -> tuple[list[str], int]:
    eligible = selectors.eligible_devices(job=job)
    k = selectors.selection_size(job=job, eligible=len(eligible))
    if k == 0:
        return [], len(eligible)
    # Deterministic for (job seed, round): the same choice after a retried task.
    rng = np.random.default_rng([max(job.seed, 0), number])
    ids = [str(d.pk) for d in eligible]
    chosen = sorted(ids[i] for i in rng.choice(len(ids), size=k, replace=False))
    return chosen, len(eligible)


@transaction.atomic
def round_open(*, job_id: int) -> FederatedRound | None:
    """Open the job's next round (or finish the job after its last round).

    Safe to call repeatedly: a round already collecting is left alone, a pending round
    (too few eligible devices last time) retries its selection.
    """
    job = FederatedJob.objects.select_for_update().filter(id=job_id).first()
    if job is None or job.status != FederatedJob.Status.RUNNING:
        return None
    busy = FederatedRound.objects.filter(
        job=job,
        status__in=(
            FederatedRound.Status.COLLECTING,
            FederatedRound.Status.AGGREGATING,
            FederatedRound.Status.EVALUATING,
        ),
    ).first()
    if busy is not None:
        return busy
    last = FederatedRound.objects.filter(job=job).order_by("-number").first()
    if last is not None and last.status == FederatedRound.Status.PENDING:
        rnd = last
    else:
        number = (last.number + 1) if last is not None else 1
        if number > job.rounds:
            _job_finish(job=job)
            return None
        base = job.base_version
        if last is not None:
            done = FederatedRound.objects.filter(job=job, status=FederatedRound.Status.DONE).order_by(
                "-number"
            )
            latest = done.select_related("version").first()
            if latest is not None and latest.version is not None:
                base = latest.version
        rnd = FederatedRound.objects.create(job=job, number=number, base_version=base)
        data = _weights_of(base)
        name = storage.save_bytes(
            name=f"{storage.round_dir(job_id=job.pk, round_number=number)}/global.safetensors", data=data
        )
        rnd.weights_path = name
        rnd.weights_sha256 = storage.sha256_hex(data)
        rnd.weights_size = len(data)
        rnd.save(update_fields=["weights_path", "weights_sha256", "weights_size"])
        FederatedJob.objects.filter(id=job.pk).update(current_round=number)

    chosen, eligible = _select(job=job, number=rnd.number)
    if not chosen:
        if rnd.failure_reason == "":
            rnd.failure_reason = f"waiting for devices: {eligible} eligible, need {job.min_clients}"
            rnd.save(update_fields=["failure_reason"])
        return rnd
    now = timezone.now()
    rnd.selected = chosen
    rnd.status = FederatedRound.Status.COLLECTING
    rnd.opened_at = now
    rnd.deadline = now + timedelta(seconds=job.round_deadline_s)
    rnd.failure_reason = ""
    rnd.durations = {**rnd.durations, "eligible": eligible}
    rnd.save()
    _emit("federated_round.status", {"job": job.pk, "round": rnd.number, "status": rnd.status})
    round_id = rnd.pk
    transaction.on_commit(lambda: notify.rounds_changed(round_id=round_id))
    # Agents between heartbeats learn of the round from their nudge socket.
    from core.events import emit

    emit("federated_round.opened", {"job": job.pk, "round": rnd.number, "devices": chosen})
    return rnd


def _job_finish(*, job: FederatedJob) -> None:
    FederatedJob.objects.filter(id=job.pk, status=FederatedJob.Status.RUNNING).update(
        status=FederatedJob.Status.SUCCEEDED, finished_at=timezone.now()
    )
    audit_record(actor=None, action="federated_job.succeeded", target=job)
    _emit("federated_job.status", {"job": job.pk, "status": "succeeded"})


def round_for_device(*, round_id: int, device: Device) -> FederatedRound:
    """The round ``round_id`` if it is collecting and selected ``device``."""
    rnd = (
        FederatedRound.objects.select_related("job", "job__family", "base_version")
        .filter(id=round_id)
        .first()
    )
    if rnd is None:
        raise NotFoundError("No such round.", code="not_found")
    if str(device.pk) not in (rnd.selected or []):
        raise ServiceError(
            "This device was not selected for the round.", code="not_selected", status_code=403
        )
    return rnd


def round_task(*, round_id: int, device: Device) -> dict[str, Any]:
    """What a selected device needs to train for a round (the ``rounds/<id>/task`` body)."""
    rnd = round_for_device(round_id=round_id, device=device)
    if rnd.status != FederatedRound.Status.COLLECTING:
        raise ConflictError(f"Round is {rnd.status}, not collecting.", code="round_closed")
    job = rnd.job
    return {
        "round_id": rnd.pk,
        "job_id": job.pk,
        "round_number": rnd.number,
        "arch": rnd.base_version.effective_arch,
        "base_version_id": rnd.base_version_id,
        "weights_url": f"/api/agent/v1/rounds/{rnd.pk}/weights",
        "weights_sha256": rnd.weights_sha256,
        "weights_size": rnd.weights_size,
        "update_url": f"/api/agent/v1/rounds/{rnd.pk}/update",
        "deadline": rnd.deadline.isoformat() if rnd.deadline else None,
        "seed": int(job.seed) * 100_003 + rnd.number,
        "train": {
            "epochs": job.local_epochs,
            "batch_size": job.batch_size,
            "optimizer": job.optimizer,
            "lr": job.lr,
            "prox_mu": job.prox_mu if job.strategy == "fedprox" or job.prox_mu > 0 else 0.0,
        },
        "clip_norm": job.clip_norm,
        "codec": job.codec,
        "topk_fraction": job.topk_fraction,
        "max_update_bytes": int(settings.ROUND_UPDATE_MAX_BYTES),
    }


_bytes_cache: dict[str, bytes] = {}


def round_weights_bytes(*, rnd: FederatedRound) -> bytes:
    """The round's global weights file (kept in memory by digest: every device fetches it)."""
    data = _bytes_cache.get(rnd.weights_sha256)
    if data is None:
        data = storage.read_bytes(name=rnd.weights_path)
        if len(_bytes_cache) > 8:
            _bytes_cache.clear()
        _bytes_cache[rnd.weights_sha256] = data
    return data


def round_weights_served(*, round_id: int, nbytes: int) -> None:
    """Count bytes of global weights sent to devices."""
    FederatedRound.objects.filter(id=round_id).update(bytes_out=F("bytes_out") + nbytes)


class UpdateRejected(ServiceError):
    """A delta that was refused; recorded as a rejected ClientUpdate."""

    status_code = 422


def _reject(
    *, rnd: FederatedRound, device: Device, code: str, message: str, status_code: int, nbytes: int
) -> UpdateRejected:
    try:
        with transaction.atomic():
            ClientUpdate.objects.create(
                round=rnd,
                device=device,
                status=ClientUpdate.Status.REJECTED,
                reason_code=code,
                reason_message=message[:2000],
                bytes=nbytes,
            )
            FederatedRound.objects.filter(id=rnd.pk).update(rejected=F("rejected") + 1)
            _maybe_close_when_complete(rnd=rnd)
    except IntegrityError:
        pass  # a concurrent upload from the same device won the row; this one is refused anyway
    return UpdateRejected(message, code=code, status_code=status_code)


def _maybe_close_when_complete(*, rnd: FederatedRound) -> None:
    """Close as soon as every selected device answered: no waiting for the deadline."""
    answered = ClientUpdate.objects.filter(round_id=rnd.pk, device_id__in=rnd.selected).count()
    if answered >= len(rnd.selected):
        _enqueue("training.round_close", rnd.pk)


def _parse_metrics(raw: str | None) -> dict[str, float]:
    if not raw:
        return {}
    if len(raw) > MAX_METRICS_JSON:
        raise ValueError("metrics are too long")
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("metrics must be a JSON object")
    out: dict[str, float] = {}
    for key, item in value.items():
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            raise ValueError(f"metric {key!r} must be a finite number")
        out[str(key)[:40]] = float(item)
    return out


def update_receive(
    *,
    round_id: int,
    device: Device,
    body: bytes,
    num_examples: str | None,
    metrics: str | None,
    declared_size: int | None = None,
) -> tuple[ClientUpdate, bool]:
    """Validate and record one device's delta for a round.

    Returns ``(update, created)``; re-sending the identical bytes returns the accepted
    update with ``created=False`` (idempotent retries), different bytes are a 409
    ``duplicate_update``. Every other refusal is recorded as a rejected update with its
    reason and raised as a 4xx :class:`ServiceError` whose code is the reason.
    ``declared_size`` is set (and ``body`` empty) when the request announced a body over
    the limit, which is then refused without being read.
    """
    rnd = FederatedRound.objects.select_related("job").filter(id=round_id).first()
    if rnd is None:
        raise NotFoundError("No such round.", code="not_found")
    digest = storage.sha256_hex(body)
    existing = ClientUpdate.objects.filter(round=rnd, device=device).first()
    if existing is not None:
        if existing.status == ClientUpdate.Status.ACCEPTED and existing.sha256 == digest:
            return existing, False
        raise ConflictError(
            "This device already sent an update for the round.",
            code="duplicate_update",
            details={"status": existing.status},
        )
    nbytes = declared_size if declared_size is not None else len(body)
    job = rnd.job
    if str(device.pk) not in (rnd.selected or []):
        raise _reject(
            rnd=rnd,
            device=device,
            code="not_selected",
            message="This device was not selected for the round.",
            status_code=403,
            nbytes=nbytes,
        )
    if rnd.status != FederatedRound.Status.COLLECTING:
        raise _reject(
            rnd=rnd,
            device=device,
            code="round_closed",
            message=f"Round is {rnd.status}, not collecting.",
            status_code=409,
            nbytes=nbytes,
        )
    limit = int(settings.ROUND_UPDATE_MAX_BYTES)
    if nbytes > limit:
        raise _reject(
            rnd=rnd,
            device=device,
            code="too_large",
            message=f"Update is {nbytes} bytes; the limit is {limit}.",
            status_code=413,
            nbytes=nbytes,
        )
    try:
        examples = int(num_examples or "")
        if examples < 1:
            raise ValueError
    except ValueError:
        raise _reject(
            rnd=rnd,
            device=device,
            code="bad_num_examples",
            message="num_examples must be a positive integer.",
            status_code=400,
            nbytes=nbytes,
        ) from None
    try:
        local_metrics = _parse_metrics(metrics)
    except (ValueError, json.JSONDecodeError) as exc:
        raise _reject(
            rnd=rnd, device=device, code="bad_metrics", message=str(exc), status_code=400, nbytes=nbytes
        ) from None
    global_weights = _round_weights(rnd)
    expected = {name: (tuple(t.shape), "float32") for name, t in global_weights.items()}
    try:
        delta = decode_delta(body, expected=expected, max_bytes=limit)
    except WireError as exc:
        status_code = 413 if exc.code == "too_large" else 400
        raise _reject(
            rnd=rnd, device=device, code=exc.code, message=exc.message, status_code=status_code, nbytes=nbytes
        ) from None
    norm = l2_norm(delta)
    bound = job.max_update_norm or (job.clip_norm * job.norm_slack if job.clip_norm else None)
    if bound is not None and norm > bound:
        raise _reject(
            rnd=rnd,
            device=device,
            code="norm_too_large",
            message=f"Update L2 norm {norm:.4g} exceeds the bound {bound:.4g}.",
            status_code=422,
            nbytes=nbytes,
        )
    # The decoded delta is stored dense float32, so aggregation memory-maps it without
    # decoding again and the order-statistics rules can read it in chunks.
    name = storage.save_bytes(
        name=f"{storage.round_dir(job_id=job.pk, round_number=rnd.number)}/updates/{device.pk}.safetensors",
        data=encode_tensors(delta),
    )
    try:
        with transaction.atomic():
            update = ClientUpdate.objects.create(
                round=rnd,
                device=device,
                status=ClientUpdate.Status.ACCEPTED,
                num_examples=examples,
                bytes=nbytes,
                sha256=digest,
                norm=norm,
                path=name,
                metrics=local_metrics,
            )
            # Counted only while the round still collects: an update racing the close
            # is stored but the round's counters stay those the aggregation used.
            FederatedRound.objects.filter(id=rnd.pk, status=FederatedRound.Status.COLLECTING).update(
                participants=F("participants") + 1, bytes_in=F("bytes_in") + nbytes
            )
            _maybe_close_when_complete(rnd=rnd)
    except IntegrityError:
        raise ConflictError(
            "This device already sent an update for the round.", code="duplicate_update"
        ) from None
    return update, True


_weights_cache: dict[str, Weights] = {}


def _round_weights(rnd: FederatedRound) -> Weights:
    """The round's global weights (cached by digest: every upload validates against them)."""
    cached = _weights_cache.get(rnd.weights_sha256)
    if cached is not None:
        return cached
    tensors, _ = decode_tensors(storage.read_bytes(name=rnd.weights_path))
    weights = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    if len(_weights_cache) > 8:
        _weights_cache.clear()
    _weights_cache[rnd.weights_sha256] = weights
    return weights


@transaction.atomic
def round_close(*, round_id: int) -> FederatedRound | None:
    """Close a collecting round: aggregate it when it has quorum, otherwise fail it.

    Called when every selected device answered and by the periodic tick at the
    deadline; before the deadline a round with missing devices stays open.
    """
    rnd = FederatedRound.objects.select_related("job").filter(id=round_id).first()
    if rnd is None or rnd.status != FederatedRound.Status.COLLECTING:
        return rnd
    job = rnd.job
    now = timezone.now()
    updates = ClientUpdate.objects.filter(round=rnd, device_id__in=rnd.selected)
    accepted = updates.filter(status=ClientUpdate.Status.ACCEPTED).count()
    answered = updates.count()
    complete = answered >= len(rnd.selected)
    past_deadline = rnd.deadline is not None and now >= rnd.deadline
    if not complete and not past_deadline:
        return rnd
    dropped = len(rnd.selected) - answered
    collect_s = (now - rnd.opened_at).total_seconds() if rnd.opened_at else None
    durations = {**rnd.durations, "collect_s": collect_s}
    if accepted >= min(job.quorum, len(rnd.selected)) and accepted > 0:
        changed = FederatedRound.objects.filter(id=rnd.pk, status=FederatedRound.Status.COLLECTING).update(
            status=FederatedRound.Status.AGGREGATING,
            closed_at=now,
            dropped=dropped,
            participants=accepted,
            durations=durations,
            aggregating_since=None,
        )
        if changed:
            _enqueue("training.round_aggregate", rnd.pk)
            _emit("federated_round.status", {"job": job.pk, "round": rnd.number, "status": "aggregating"})
    else:
        reason = f"{accepted} accepted update(s) at the deadline; quorum is {job.quorum}"
        changed = FederatedRound.objects.filter(id=rnd.pk, status=FederatedRound.Status.COLLECTING).update(
            status=FederatedRound.Status.FAILED,
            closed_at=now,
            finished_at=now,
            dropped=dropped,
            participants=accepted,
            durations=durations,
            failure_reason=reason,
        )
        if changed:
            _round_failed(job=job, rnd=rnd, reason=reason)
    rnd.refresh_from_db()
    return rnd


def _round_failed(*, job: FederatedJob, rnd: FederatedRound, reason: str) -> None:
    FederatedJob.objects.filter(id=job.pk).update(consecutive_failures=F("consecutive_failures") + 1)
    job.refresh_from_db()
    _emit(
        "federated_round.status", {"job": job.pk, "round": rnd.number, "status": "failed", "reason": reason}
    )
    if job.consecutive_failures >= job.max_consecutive_failures:
        message = f"{job.consecutive_failures} consecutive rounds failed; last: {reason}"
        if FederatedJob.objects.filter(id=job.pk, status=FederatedJob.Status.RUNNING).update(
            status=FederatedJob.Status.FAILED, error=message, finished_at=timezone.now()
        ):
            audit_record(actor=None, action="federated_job.failed", target=job, data={"error": message})
            _emit("federated_job.status", {"job": job.pk, "status": "failed"})
        return
    _enqueue("training.round_open", job.pk)


def rounds_tick() -> dict[str, int]:
    """Periodic: close rounds past their deadline, retry pending rounds, re-claim stale
    aggregations, open rounds for running jobs that have none."""
    now = timezone.now()
    counts = {"closed": 0, "reopened": 0, "reclaimed": 0}
    for rid in FederatedRound.objects.filter(
        status=FederatedRound.Status.COLLECTING, deadline__lte=now
    ).values_list("id", flat=True):
        round_close(round_id=rid)
        counts["closed"] += 1
    lease = timedelta(seconds=float(_setting("ROUND_AGGREGATION_LEASE_S", 60)))
    stale = FederatedRound.objects.filter(
        status__in=(FederatedRound.Status.AGGREGATING, FederatedRound.Status.EVALUATING),
        aggregating_since__lt=now - lease,
    ).values_list("id", flat=True)
    for rid in stale:
        with transaction.atomic():
            _enqueue("training.round_aggregate", rid)
        counts["reclaimed"] += 1
    running = FederatedJob.objects.filter(status=FederatedJob.Status.RUNNING).values_list("id", flat=True)
    for job_id in running:
        active = FederatedRound.objects.filter(
            job_id=job_id,
            status__in=(
                FederatedRound.Status.COLLECTING,
                FederatedRound.Status.AGGREGATING,
                FederatedRound.Status.EVALUATING,
            ),
        ).exists()
        if not active:
            round_open(job_id=job_id)
            counts["reopened"] += 1
    return counts


# --------------------------------------------------------------------------- aggregation


class LeaseLost(Exception):
    """Another worker took over the round's aggregation."""


def _claim(*, round_id: int) -> Any:
    """Take the aggregation lease; returns its timestamp (the token) or None."""
    now = timezone.now()
    lease = timedelta(seconds=float(_setting("ROUND_AGGREGATION_LEASE_S", 60)))
    free = Q(aggregating_since__isnull=True) | Q(aggregating_since__lt=now - lease)
    changed = FederatedRound.objects.filter(
        Q(id=round_id),
        Q(status__in=(FederatedRound.Status.AGGREGATING, FederatedRound.Status.EVALUATING)),
        free,
    ).update(aggregating_since=now)
    return now if changed == 1 else None


def _renew(*, round_id: int, token: Any, **fields: Any) -> Any:
    now = timezone.now()
    changed = FederatedRound.objects.filter(id=round_id, aggregating_since=token).update(
        aggregating_since=now, **fields
    )
    if changed != 1:
        raise LeaseLost(f"round {round_id}: aggregation lease lost")
    return now


def _server_state(job: FederatedJob) -> Any:
    if not job.server_state_path:
        return None
    return state_from_bytes(storage.read_bytes(name=job.server_state_path))


def round_aggregate(
    *, round_id: int, on_update: Callable[[int], None] | None = None
) -> FederatedRound | None:
    """Aggregate a closed round, evaluate it and record the new version.

    Claims a lease first, so a duplicate delivery while another worker is busy is a
    no-op; a worker that died leaves a lease that expires and is re-claimed by the
    tick. Mergeable strategies checkpoint their running sum every
    ``ROUND_CHECKPOINT_EVERY`` updates together with the ids in it, so the resumed task
    skips exactly those updates.
    """
    token = _claim(round_id=round_id)
    if token is None:
        return None
    rnd = FederatedRound.objects.select_related("job", "job__family", "base_version").get(id=round_id)
    job = rnd.job
    started = time.monotonic()
    try:
        if rnd.status == FederatedRound.Status.AGGREGATING:
            new_weights, token = _aggregate(rnd=rnd, job=job, token=token, on_update=on_update)
            weights_bytes = encode_tensors(new_weights)
            name = storage.save_bytes(
                name=f"{storage.round_dir(job_id=job.pk, round_number=rnd.number)}/result.safetensors",
                data=weights_bytes,
            )
            durations = {**rnd.durations, "aggregate_s": time.monotonic() - started}
            token = _renew(
                round_id=rnd.pk,
                token=token,
                status=FederatedRound.Status.EVALUATING,
                durations=durations,
            )
            rnd.refresh_from_db()
            rnd.durations = durations
        # Evaluating: the aggregate is on storage, evaluation and registration are
        # repeatable, so a crash here restarts from the stored result.
        name = f"{storage.round_dir(job_id=job.pk, round_number=rnd.number)}/result.safetensors"
        weights_bytes = storage.read_bytes(name=name)
        tensors, _ = decode_tensors(weights_bytes)
        new_weights = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
        _finish(rnd=rnd, job=job, token=token, weights=new_weights, weights_bytes=weights_bytes)
    except LeaseLost:
        logger.warning("round %s: another worker owns the aggregation now", round_id)
        return None
    except (ValueError, OSError) as exc:
        logger.exception("round %s: aggregation failed", round_id)
        with transaction.atomic():
            changed = FederatedRound.objects.filter(id=round_id, aggregating_since=token).update(
                status=FederatedRound.Status.FAILED,
                failure_reason=f"aggregation failed: {exc}"[:2000],
                finished_at=timezone.now(),
            )
            if changed:
                _round_failed(job=job, rnd=rnd, reason=str(exc))
        return None
    rnd.refresh_from_db()
    return rnd


def _aggregate(
    *, rnd: FederatedRound, job: FederatedJob, token: Any, on_update: Callable[[int], None] | None
) -> tuple[Weights, Any]:
    global_weights = _round_weights(rnd)
    updates = list(
        ClientUpdate.objects.filter(
            round=rnd, status=ClientUpdate.Status.ACCEPTED, device_id__in=rnd.selected
        ).order_by("id")
    )
    if not updates:
        raise ValueError("no accepted updates")
    delay = float(_setting("ROUND_AGGREGATE_DELAY_S", 0.0))
    dp = job.noise_multiplier > 0 and job.clip_norm is not None
    strategy = job.strategy
    params = dict(job.strategy_params or {})
    if strategy in ("fedadam", "fedyogi"):
        params["state"] = _server_state(job)
    if strategy in MERGEABLE:
        agg = make_aggregator(strategy, global_weights=global_weights, **params)
        mean: WeightedMeanAggregator = agg.mean if isinstance(agg, ServerOptAggregator) else agg  # type: ignore[assignment]
        partial = PartialAggregate.objects.filter(round=rnd).first()
        if partial is not None:
            resumed = partial_from_bytes(storage.read_bytes(name=partial.path), global_weights=global_weights)
            mean.merge(resumed)
        every = max(1, int(_setting("ROUND_CHECKPOINT_EVERY", 8)))
        since_checkpoint = 0
        reader = UpdateFileReader()
        with storage.local_paths(names=[u.path for u in updates]) as paths:
            for update, path in zip(updates, paths, strict=True):
                uid = str(update.pk)
                if uid in mean.accepted_ids:
                    continue
                delta: Any = reader.read(path)
                if job.clip_norm is not None:
                    delta, _ = clip_update(delta, max_norm=job.clip_norm)
                # DP-FedAvg averages with equal weights (the sensitivity bound needs it);
                # otherwise FedAvg weights by local examples.
                weight = 1.0 if dp else float(update.num_examples)
                mean.accept(delta, weight=weight, update_id=uid)
                del delta
                since_checkpoint += 1
                if on_update is not None:
                    on_update(update.pk)
                if delay:
                    time.sleep(delay)
                if since_checkpoint >= every:
                    token = _checkpoint(rnd=rnd, mean=mean, token=token)
                    since_checkpoint = 0
        if dp:
            assert job.clip_norm is not None
            noisy = add_gaussian_noise(
                mean.mean_delta(),
                clip_norm=job.clip_norm,
                noise_multiplier=job.noise_multiplier,
                num_participants=mean.num_accepted,
                rng=np.random.default_rng([max(job.seed, 0), rnd.number, 7]),
            )
            if isinstance(agg, ServerOptAggregator):
                new_weights, agg.state = agg.optimizer.step(
                    global_weights=global_weights, pseudo_gradient=noisy, state=agg.state
                )
            else:
                new_weights = {n: (global_weights[n] + noisy[n]).astype(np.float32) for n in global_weights}
        else:
            new_weights = agg.finalize()
        if isinstance(agg, ServerOptAggregator):
            state_name = storage.save_bytes(
                name=f"{storage.round_dir(job_id=job.pk, round_number=rnd.number)}/server_state.safetensors",
                data=state_to_bytes(agg.state),
            )
            FederatedRound.objects.filter(id=rnd.pk).update(
                durations={**rnd.durations, "server_state": state_name}
            )
            rnd.durations = {**rnd.durations, "server_state": state_name}
        return {k: np.asarray(v, np.float32) for k, v in new_weights.items()}, token
    robust = make_aggregator(strategy, global_weights=global_weights, **params)
    with storage.local_paths(names=[u.path for u in updates]) as paths:
        source = SafetensorsFileSource(paths)
        result = robust.finalize_source(source)  # type: ignore[union-attr]
    if on_update is not None:
        for update in updates:
            on_update(update.pk)
    return {k: np.asarray(v, np.float32) for k, v in result.items()}, token


def _checkpoint(*, rnd: FederatedRound, mean: WeightedMeanAggregator, token: Any) -> Any:
    """Persist the running sum and its ids in one row write, renewing the lease."""
    data = partial_to_bytes(mean)
    ids = sorted(mean.accepted_ids)
    # A new file name per checkpoint: the row switches to it atomically, so a crash
    # between the file write and the row update leaves the previous checkpoint valid.
    folder = storage.round_dir(job_id=rnd.job_id, round_number=rnd.number)
    name = storage.save_bytes(name=f"{folder}/partial_{len(ids):06d}.safetensors", data=data)
    with transaction.atomic():
        token = _renew(round_id=rnd.pk, token=token)
        old = PartialAggregate.objects.filter(round=rnd).first()
        PartialAggregate.objects.update_or_create(round=rnd, defaults={"path": name, "accepted_ids": ids})
    if old is not None and old.path != name:
        storage.delete_quietly(name=old.path)
    return token


def _evaluate(*, arch: str, weights: Weights) -> dict[str, Any]:
    from devices_agent.data import load_digits_split
    from devices_agent.local_train import evaluate_numpy

    _, _, x_test, y_test = load_digits_split(seed=0, test_size=0.2)
    loss, accuracy = evaluate_numpy(arch=arch, weights=weights, x=x_test, y=y_test)
    predictions = _predict(arch=arch, weights=weights, x=x_test)
    confusion = np.zeros((10, 10), dtype=np.int64)
    np.add.at(confusion, (y_test, predictions), 1)
    return {"accuracy": accuracy, "loss": loss, "confusion": confusion.tolist(), "x_sample": x_test[:64]}


def _predict(*, arch: str, weights: Weights, x: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    import torch

    from devices_agent.local_train import torch_threads
    from devices_agent.nets import build_model_for_state

    with torch_threads(1):
        model = build_model_for_state(arch, weights)
        model.eval()
        with torch.no_grad():
            logits = model(torch.from_numpy(np.ascontiguousarray(x)))
    return np.asarray(logits.argmax(dim=1).numpy(), dtype=np.int64)


def _finish(
    *, rnd: FederatedRound, job: FederatedJob, token: Any, weights: Weights, weights_bytes: bytes
) -> None:
    started = time.monotonic()
    arch = rnd.base_version.effective_arch
    report = _evaluate(arch=arch, weights=weights)
    onnx_bytes: bytes | None = None
    if job.export_onnx:
        try:
            from models_registry.ml.export import export_onnx

            onnx_bytes = export_onnx(arch=arch, weights=weights, sample_inputs=report["x_sample"]).onnx_bytes
        except Exception:  # the weights are the result; ONNX can be exported later
            logger.exception("round %s: ONNX export failed", rnd.pk)
    epsilon = None
    if job.noise_multiplier > 0 and job.clip_norm is not None:
        eligible = max(int(rnd.durations.get("eligible", len(rnd.selected)) or 1), len(rnd.selected), 1)
        epsilon = epsilon_for(
            noise_multiplier=job.noise_multiplier,
            sample_rate=min(1.0, len(rnd.selected) / eligible),
            steps=rnd.number,
            delta=job.dp_delta,
        )
    durations = {**rnd.durations, "evaluate_s": time.monotonic() - started}
    with transaction.atomic():
        # The lease check makes the version creation happen once: a worker that lost
        # the lease rolls back here.
        now = timezone.now()
        changed = FederatedRound.objects.filter(
            id=rnd.pk, status=FederatedRound.Status.EVALUATING, aggregating_since=token
        ).update(status=FederatedRound.Status.DONE, finished_at=now)
        if changed != 1:
            raise LeaseLost(f"round {rnd.pk}: finished elsewhere")
        version = _version_create(
            family=job.family,
            parent=rnd.base_version,
            arch=rnd.base_version.arch,
            weights_bytes=weights_bytes,
            onnx_bytes=onnx_bytes,
            source_detail={"job": job.pk, "round": rnd.number},
            metrics={"accuracy": report["accuracy"], "loss": report["loss"]},
        )
        FederatedRound.objects.filter(id=rnd.pk).update(
            version=version,
            accuracy=report["accuracy"],
            loss=report["loss"],
            confusion=report["confusion"],
            epsilon=epsilon,
            durations=durations,
        )
        job_updates: dict[str, Any] = {"consecutive_failures": 0}
        if "server_state" in rnd.durations:
            job_updates["server_state_path"] = rnd.durations["server_state"]
        if job.best_accuracy is None or report["accuracy"] > job.best_accuracy:
            job_updates.update(best_accuracy=report["accuracy"], best_version=version)
        FederatedJob.objects.filter(id=job.pk).update(**job_updates)
        _emit(
            "federated_round.status",
            {"job": job.pk, "round": rnd.number, "status": "done", "accuracy": report["accuracy"]},
        )
        _enqueue("training.round_open", job.pk)
    partial = PartialAggregate.objects.filter(round=rnd).first()
    if partial is not None:
        storage.delete_quietly(name=partial.path)


def _version_create(
    *,
    family: ModelFamily,
    parent: ModelVersion,
    arch: str,
    weights_bytes: bytes,
    onnx_bytes: bytes | None,
    source_detail: dict[str, Any],
    metrics: dict[str, Any],
) -> ModelVersion:
    """Register the round's result through the registry (validated, stored, signed)."""
    from models_registry.services import version_create

    return version_create(
        family=family,
        weights=weights_bytes,
        onnx=onnx_bytes,
        parent=parent,
        source=ModelVersion.Source.FEDERATED,
        source_detail=source_detail,
        arch=arch,
        metrics=metrics,
    )


# --------------------------------------------------------------------------- demo


def demo_job_start(
    *, family_name: str, group_name: str, rounds: int = 20, actor: Any = None, **fields: Any
) -> FederatedJob:
    """Create and start a federated job on the simulated fleet's group (``make demo``).

    Starts from the family's newest version that has weights; defaults suit the demo's
    digits MLP (1 local epoch, SGD lr 0.05, FedAvg, int8 deltas, 60 s deadline).
    """
    family = ModelFamily.objects.get(name=family_name)
    group = DeviceGroup.objects.get(name=group_name)
    base = (
        ModelVersion.objects.filter(family=family, artifacts__kind=Artifact.Kind.WEIGHTS)
        .order_by("-number")
        .first()
    )
    if base is None:
        raise ServiceError(f"family {family_name!r} has no version with weights", code="no_weights")
    defaults: dict[str, Any] = {
        "name": "demo federated training",
        "rounds": rounds,
        "min_clients": 2,
        "quorum": 2,
        "local_epochs": 1,
        "lr": 0.05,
        "codec": "int8",
        "round_deadline_s": 60,
        "export_onnx": True,
    }
    defaults.update(fields)
    job = job_create(actor=actor, family=family, base_version=base, target_group=group, **defaults)
    return job_start(job_id=job.pk, actor=actor)
