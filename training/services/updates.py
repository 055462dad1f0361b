"""Devices' updates: validating and storing one delta per device and round, recording every
refusal with its reason, and the failures devices report (artifacts they could not verify
or train with).

The request that brings the last answer a round waits for closes it after its commit
(``training.round_close``'s work, sent to a worker when that fails), so a round whose
devices all answered closes without waiting for its deadline or for a broker hop.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F

from core.api import ConflictError, NotFoundError, ServiceError
from core.dispatch import run_on_commit
from devices_agent.codecs import WireError, decode_delta, encode_tensors, l2_norm
from devices_agent.wire import TRAINING_BACKENDS
from fleet.models import Device
from training import selectors, storage
from training.models import ClientUpdate, FederatedRound
from training.services.rounds import round_close

MAX_METRICS_JSON = 4096


class UpdateRejected(ServiceError):
    """A delta that was refused; recorded as a rejected ClientUpdate."""

    status_code = 422


def _backend_of(declared: str | None, metrics: dict[str, float]) -> str:
    """The backend an update names (``X-Backend``), else the one its ``backend_<name>`` metric says."""
    if declared in TRAINING_BACKENDS:
        return str(declared)
    named = [b for b in TRAINING_BACKENDS if metrics.get(f"backend_{b}") == 1.0]
    return named[0] if len(named) == 1 else ""


def _reject(
    *,
    rnd: FederatedRound,
    device: Device,
    code: str,
    message: str,
    status_code: int,
    nbytes: int,
    backend: str = "",
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
                backend=backend,
            )
            FederatedRound.objects.filter(id=rnd.pk).update(rejected=F("rejected") + 1)
            _maybe_close_when_complete(rnd=rnd)
    except IntegrityError:
        pass  # a concurrent upload from the same device won the row; this one is refused anyway
    return UpdateRejected(message, code=code, status_code=status_code)


def _maybe_close_when_complete(*, rnd: FederatedRound) -> None:
    """Close as soon as every selected device answered: no waiting for the deadline, and
    no broker hop either: the request that brought the last answer closes the round
    after its commit (which sends the aggregation)."""
    if selectors.round_answered(rnd=rnd) >= len(rnd.selected):
        round_id = rnd.pk
        run_on_commit("training.round_close", round_id, run=lambda: round_close(round_id=round_id))


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


def _capped(
    *, rnd: FederatedRound, device: Device, examples: int, metrics: dict[str, float]
) -> tuple[int, dict[str, float]]:
    """The update's weight and holdout count, capped by what the board reported when chosen.

    A claim above it (``X-Num-Examples: 2000000000``) counts as the reported number, and
    never above the job's ``max_examples_per_update``; the claim is kept in the metrics.
    """
    reported = (rnd.selected_examples or {}).get(str(device.pk))
    cap = int(rnd.job.max_examples_per_update)
    if reported is not None:
        cap = min(cap, max(int(reported[0]), 1))
    out = dict(metrics)
    if examples > cap:
        out["claimed_examples"] = float(examples)
        examples = cap
    holdout = out.get("holdout_examples")
    if holdout is not None and reported is not None and holdout > max(int(reported[1]), 1):
        out["claimed_holdout_examples"] = holdout
        out["holdout_examples"] = float(max(int(reported[1]), 1))
    return examples, out


def update_receive(
    *,
    round_id: int,
    device: Device,
    body: bytes,
    num_examples: str | None,
    metrics: str | None,
    declared_size: int | None = None,
    backend: str | None = None,
) -> tuple[ClientUpdate, bool]:
    """Validate and record one device's delta for a round.

    Returns ``(update, created)``; re-sending the identical bytes returns the accepted
    update with ``created=False`` (idempotent retries), different bytes are a 409
    ``duplicate_update``. Every other refusal is recorded as a rejected update with its
    reason and raised as a 4xx :class:`ServiceError` whose code is the reason.
    ``declared_size`` is set (and ``body`` empty) when the request announced a body over
    the limit, which is then refused without being read. ``backend`` is the training
    runtime the device names (``X-Backend``), recorded with the update.
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
    examples, local_metrics = _capped(rnd=rnd, device=device, examples=examples, metrics=local_metrics)
    global_weights = selectors.round_weights(rnd=rnd)
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
    if bound is None:
        # Without a bound of the job's own, an update may not move the model by more than
        # ROUND_MAX_UPDATE_NORM_RATIO times its own size: past that it is not training.
        bound = float(settings.ROUND_MAX_UPDATE_NORM_RATIO) * max(l2_norm(global_weights), 1.0)
    if norm > bound:
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
                backend=_backend_of(backend, local_metrics),
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


def evaluation_receive(
    *, round_id: int, device: Device, metrics: dict[str, object]
) -> tuple[ClientUpdate, bool]:
    """Record one board's measurement of an evaluation round's model on its holdout.

    ``metrics`` holds ``holdout_<metric>`` (the family's primary metric), ``holdout_loss``
    and ``holdout_examples``; nothing else of the holdout leaves the board. Sending the
    same numbers again answers the stored row (``created=False``); other numbers are a
    409 ``duplicate_update``. Refusals: ``not_selected`` (403), ``round_closed`` (409),
    ``not_an_evaluation`` (409, a training round), ``bad_metrics`` (400).
    """
    rnd = FederatedRound.objects.select_related("job", "job__family").filter(id=round_id).first()
    if rnd is None:
        raise NotFoundError("No such round.", code="not_found")
    if str(device.pk) not in (rnd.selected or []):
        raise ServiceError(
            "This device was not selected for the round.", code="not_selected", status_code=403
        )
    if rnd.kind != FederatedRound.Kind.EVALUATE:
        raise ConflictError("This round trains: send an update, not an evaluation.", code="not_an_evaluation")
    spec = rnd.job.family.spec
    wanted = (f"holdout_{spec.primary_metric}", "holdout_loss", "holdout_examples")
    try:
        clean = _parse_metrics(json.dumps({k: metrics.get(k) for k in wanted}))
    except ValueError as exc:
        raise ServiceError(f"{exc}; an evaluation carries {list(wanted)}", code="bad_metrics") from None
    examples = clean["holdout_examples"]
    if examples < 1 or examples != int(examples):
        raise ServiceError("holdout_examples must be a whole number of at least 1", code="bad_metrics")
    # A board's weight in the mean is what it said it holds when chosen (or since: its
    # holdout grows with its data), no more; a larger claim is kept beside the capped one.
    chosen = (rnd.selected_examples or {}).get(str(device.pk)) or [0, 0]
    reported = max(int((device.state or {}).get("holdout_examples", 0) or 0), int(chosen[1]), 1)
    if examples > reported:
        clean["claimed_holdout_examples"] = examples
        clean["holdout_examples"] = examples = float(reported)
    if spec.primary_metric == "accuracy" and not 0.0 <= clean["holdout_accuracy"] <= 1.0:
        raise ServiceError("holdout_accuracy must lie in [0, 1]", code="bad_metrics")
    if clean["holdout_loss"] < 0 or clean.get(f"holdout_{spec.primary_metric}", 0.0) < 0:
        raise ServiceError("holdout metrics cannot be negative", code="bad_metrics")
    digest = storage.sha256_hex(json.dumps(clean, sort_keys=True).encode())
    existing = ClientUpdate.objects.filter(round=rnd, device=device).first()
    if existing is not None:
        if existing.sha256 == digest:
            return existing, False
        raise ConflictError("This device already sent its evaluation for the round.", code="duplicate_update")
    if rnd.status != FederatedRound.Status.COLLECTING:
        raise ConflictError(f"Round is {rnd.status}, not collecting.", code="round_closed")
    try:
        with transaction.atomic():
            update = ClientUpdate.objects.create(
                round=rnd,
                device=device,
                status=ClientUpdate.Status.ACCEPTED,
                num_examples=int(examples),
                sha256=digest,
                metrics=clean,
            )
            FederatedRound.objects.filter(id=rnd.pk, status=FederatedRound.Status.COLLECTING).update(
                participants=F("participants") + 1
            )
            _maybe_close_when_complete(rnd=rnd)
    except IntegrityError:
        raise ConflictError(
            "This device already sent its evaluation for the round.", code="duplicate_update"
        ) from None
    return update, True


FAILURE_CODE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def update_failure_receive(
    *, round_id: int, device: Device, code: Any, message: Any, backend: Any = None
) -> tuple[ClientUpdate, bool]:
    """Record that a selected device cannot take part in a round, and why.

    The board found the round's artifacts unverifiable, or not matching the weights, or
    its training failed: it says so with a ``code`` (a lower-case slug) and a ``message``,
    recorded as a rejected update, so the round stops waiting for it and closes as soon as
    every other device answered. The same report again answers the stored row
    (``created=False``); a device that already sent an update is a 409
    ``duplicate_update``. Refusals: ``not_found`` (404), ``not_selected`` (403),
    ``round_closed`` (409), ``bad_failure`` (400).
    """
    rnd = FederatedRound.objects.filter(id=round_id).first()
    if rnd is None:
        raise NotFoundError("No such round.", code="not_found")
    if str(device.pk) not in (rnd.selected or []):
        raise ServiceError(
            "This device was not selected for the round.", code="not_selected", status_code=403
        )
    if not isinstance(code, str) or not FAILURE_CODE.match(code):
        raise ServiceError("code must be a lower-case slug of at most 40 characters.", code="bad_failure")
    if not isinstance(message, str) or not message.strip():
        raise ServiceError("message must say what failed.", code="bad_failure")
    named = str(backend) if backend in TRAINING_BACKENDS else ""
    existing = ClientUpdate.objects.filter(round=rnd, device=device).first()
    if existing is not None:
        if existing.status == ClientUpdate.Status.REJECTED and existing.reason_code == code:
            return existing, False
        raise ConflictError(
            "This device already answered the round.",
            code="duplicate_update",
            details={"status": existing.status},
        )
    if rnd.status != FederatedRound.Status.COLLECTING:
        raise ConflictError(f"Round is {rnd.status}, not collecting.", code="round_closed")
    try:
        with transaction.atomic():
            update = ClientUpdate.objects.create(
                round=rnd,
                device=device,
                status=ClientUpdate.Status.REJECTED,
                reason_code=code,
                reason_message=message.strip()[:2000],
                backend=named,
            )
            FederatedRound.objects.filter(id=rnd.pk).update(rejected=F("rejected") + 1)
            _maybe_close_when_complete(rnd=rnd)
    except IntegrityError:
        raise ConflictError("This device already answered the round.", code="duplicate_update") from None
    return update, True
