"""Aggregating a closed round: the lease, checkpoints, the new version and its evaluation.

One worker at a time holds a round, through :data:`AGGREGATION_LEASE` on
``FederatedRound.lease_expires_at``: a duplicate delivery while the holder is busy does
nothing, and a worker that died leaves a lease that expires, after which the tick sends
the round again. Both phases resume after a crash:

``aggregating``
    The accepted updates go through the job's strategy (:mod:`training.aggregation`).
    Mergeable strategies checkpoint their running sum every ``ROUND_CHECKPOINT_EVERY``
    updates together with the ids in it, so the resumed task skips exactly those; a large
    round of one is summed in shards on any worker and merged here
    (:mod:`training.services.shards`). The
    result (and the server optimiser state, for strategies that keep one) is written to
    storage, and the round moves to ``evaluating``.
``evaluating``
    The stored result is registered as a version of the family (once: the write linking
    it to the round checks the lease, in the same transaction), evaluated through the
    registry's evaluation (:func:`models_registry.evaluation.version_evaluate`, an
    ``EvaluationReport`` and the version's headline metrics), and the round is done.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import Q
from django.utils import timezone

from core.api import ServiceError
from core.dispatch import run_on_commit
from core.events import emit
from core.leases import Lease, LeaseLost
from devices_agent.codecs import decode_tensors, encode_tensors
from models_registry.evaluation import Evaluation, evaluation_dataset, version_evaluate
from models_registry.ml.onnx_weights import onnx_with_weights
from models_registry.models import EvaluationDataset, ModelVersion
from models_registry.ort_training import ort_training_inherit
from models_registry.selectors import version_latest_evaluation, version_onnx, version_program
from models_registry.services import version_create
from training import selectors, storage
from training.aggregation import Aggregator, SafetensorsFileSource, Weights, make_aggregator
from training.aggregation.privacy import epsilon_for
from training.models import AggregationShard, ClientUpdate, FederatedJob, FederatedRound, PartialAggregate
from training.services.jobs import job_privacy, job_round_failed
from training.services.shards import (
    shard_size_for,
    shards_cleanup,
    shards_prepare,
    shards_reduce,
    shards_run,
    stream_updates,
)

logger = logging.getLogger(__name__)


def _setting(name: str, default: Any) -> Any:
    return getattr(settings, name, default)


AGGREGATION_LEASE = Lease(
    model=FederatedRound,
    field="lease_expires_at",
    seconds=lambda: float(_setting("ROUND_AGGREGATION_LEASE_S", 60.0)),
)
BUSY = (FederatedRound.Status.AGGREGATING, FederatedRound.Status.EVALUATING)


@dataclass
class _Claim:
    """The lease this worker holds on one round; every write that needs it goes here, so
    the token is always the latest one (a renewal changes it)."""

    round_id: int
    token: Any

    def renew(self, **updates: Any) -> None:
        self.token = AGGREGATION_LEASE.renew(self.round_id, self.token, **updates)

    def release(self, **updates: Any) -> bool:
        return AGGREGATION_LEASE.release(self.round_id, self.token, **updates)


def round_aggregate(
    *, round_id: int, on_update: Callable[[int], None] | None = None
) -> FederatedRound | None:
    """Aggregate a closed round, register and evaluate its version, and finish it.

    Returns None when another worker holds the round (or it is not closed for
    aggregation), or when the round failed; ``on_update`` is called with each update id
    as it is aggregated (tests use it to interrupt the work).
    """
    token = AGGREGATION_LEASE.claim(round_id, where=Q(status__in=BUSY))
    if token is None:
        return None
    claim = _Claim(round_id=round_id, token=token)
    rnd = FederatedRound.objects.select_related("job", "job__family", "base_version", "version").get(
        id=round_id
    )
    job = rnd.job
    phase = "aggregation"
    try:
        if rnd.kind == FederatedRound.Kind.EVALUATE:
            phase = "evaluation"
            _evaluation_round_finish(rnd=rnd, job=job, claim=claim)
            rnd.refresh_from_db()
            return rnd
        if rnd.status == FederatedRound.Status.AGGREGATING:
            _aggregate(rnd=rnd, job=job, claim=claim, on_update=on_update)
            rnd.refresh_from_db()
        phase = "evaluation"
        _evaluate_and_finish(rnd=rnd, job=job, claim=claim)
    except LeaseLost:
        logger.warning("round %s: another worker owns the aggregation now", round_id)
        return None
    except (ValueError, OSError, ServiceError) as exc:
        logger.exception("round %s: %s failed", round_id, phase)
        reason = f"{phase} failed: {exc.message if isinstance(exc, ServiceError) else exc}"[:2000]
        with transaction.atomic():
            if claim.release(
                status=FederatedRound.Status.FAILED, failure_reason=reason, finished_at=timezone.now()
            ):
                job_round_failed(job=job, rnd=rnd, reason=reason)
        return None
    rnd.refresh_from_db()
    return rnd


def _round_folder(rnd: FederatedRound) -> str:
    return storage.round_dir(job_id=rnd.job_id, round_number=rnd.number)


def _noise_key(*, rnd: FederatedRound, job: FederatedJob) -> bytes | None:
    """The round's secret noise key, created once (a conditional update: one key per round).

    Drawn by the operating system's CSPRNG and kept only on the round row, never in an
    API answer: an aggregation resumed after a crash draws the same noise, and nothing
    anyone outside the server knows determines it.
    """
    if not job.noise_multiplier > 0:
        return None
    FederatedRound.objects.filter(pk=rnd.pk, noise_key__isnull=True).update(noise_key=secrets.token_bytes(32))
    key = FederatedRound.objects.filter(pk=rnd.pk).values_list("noise_key", flat=True).get()
    assert key is not None  # set just above, by this call or an earlier one
    return bytes(key)


def _aggregate(
    *, rnd: FederatedRound, job: FederatedJob, claim: _Claim, on_update: Callable[[int], None] | None
) -> None:
    """Run the strategy over the accepted updates; store the result; move to evaluating."""
    started = time.monotonic()
    global_weights = selectors.round_weights(rnd=rnd)
    updates = list(
        ClientUpdate.objects.filter(
            round=rnd, status=ClientUpdate.Status.ACCEPTED, device_id__in=rnd.selected
        ).order_by("id")
    )
    if not updates:
        raise ValueError("no accepted updates")
    agg = make_aggregator(
        job.strategy,
        global_weights=global_weights,
        privacy=job_privacy(job=job, noise_key=_noise_key(rnd=rnd, job=job)),
        **(job.strategy_params or {}),
    )
    if job.server_state_path:
        agg.load_state(storage.read_bytes(name=job.server_state_path))
    size, why = shard_size_for(agg=agg, num_updates=len(updates))
    existing = AggregationShard.objects.filter(round=rnd).values_list("update_ids", flat=True).first()
    if existing is not None and agg.mergeable:
        # A resumed round keeps the shards it was cut into, whatever the settings say now.
        size, why = len(existing), "resuming its shards"
    if size:
        logger.info("round %s: %s", rnd.pk, why)
        shards = shards_prepare(rnd=rnd, update_ids=[u.pk for u in updates], size=size)
        done = shards_run(rnd=rnd, shards=shards, heartbeat=claim.renew, on_update=on_update)
        shards_reduce(agg=agg, shards=done, global_weights=global_weights)
        new_weights = agg.finalize()
    elif agg.mergeable:
        _stream(rnd=rnd, agg=agg, updates=updates, claim=claim, on_update=on_update)
        new_weights = agg.finalize()
    else:
        if len(updates) >= int(_setting("AGGREGATION_SHARD_MIN_UPDATES", 256)):
            logger.info("round %s: one worker: %s", rnd.pk, why)
        with storage.local_paths(names=[u.path for u in updates]) as paths:
            new_weights = agg.finalize_source(SafetensorsFileSource(paths))
        if on_update is not None:
            for update in updates:
                on_update(update.pk)
    folder = _round_folder(rnd)
    # The new model is the round's global model with the trained parameters replaced;
    # buffers and constants (e.g. BatchNorm statistics) are carried over unchanged.
    model = dict(selectors.round_state(rnd=rnd))
    model.update({k: np.asarray(v, np.float32) for k, v in new_weights.items()})
    storage.save_bytes(name=f"{folder}/result.safetensors", data=encode_tensors(model))
    fields: dict[str, Any] = {"status": FederatedRound.Status.EVALUATING}
    server_state = agg.state_bytes()
    if server_state is not None:
        # Kept on the round until it is done: only then does the job carry it on.
        fields["server_state_path"] = storage.save_bytes(
            name=f"{folder}/server_state.safetensors", data=server_state
        )
    claim.renew(aggregate_s=time.monotonic() - started, **fields)


def _stream(
    *,
    rnd: FederatedRound,
    agg: Aggregator,
    updates: list[ClientUpdate],
    claim: _Claim,
    on_update: Callable[[int], None] | None,
) -> None:
    """Accept every update not yet in the checkpoint, checkpointing as it goes."""
    partial = PartialAggregate.objects.filter(round=rnd).first()
    if partial is not None:
        agg.resume(storage.read_bytes(name=partial.path))
    stream_updates(
        agg=agg,
        updates=updates,
        checkpoint=lambda: _checkpoint(rnd=rnd, agg=agg, claim=claim),
        on_update=on_update,
    )


def _checkpoint(*, rnd: FederatedRound, agg: Aggregator, claim: _Claim) -> None:
    """Persist the running sum and its ids in one row write, renewing the lease."""
    data = agg.checkpoint()
    ids = sorted(agg.accepted_ids)
    # A new file name per checkpoint: the row switches to it atomically, so a crash
    # between the file write and the row update leaves the previous checkpoint valid.
    name = storage.save_bytes(name=f"{_round_folder(rnd)}/partial_{len(ids):06d}.safetensors", data=data)
    with transaction.atomic():
        claim.renew()
        old = PartialAggregate.objects.filter(round=rnd).first()
        PartialAggregate.objects.update_or_create(round=rnd, defaults={"path": name, "accepted_ids": ids})
    if old is not None and old.path != name:
        storage.delete_quietly(name=old.path)


def _result(rnd: FederatedRound) -> tuple[bytes, Weights]:
    """The stored result: the whole state's bytes, and its trained parameters."""
    data = storage.read_bytes(name=f"{_round_folder(rnd)}/result.safetensors")
    tensors, _ = decode_tensors(data)
    trainable = selectors.round_trainable(rnd=rnd)
    return data, {k: np.asarray(tensors[k], np.float32) for k in trainable}


def _register(
    *, rnd: FederatedRound, job: FederatedJob, claim: _Claim, weights_bytes: bytes, onnx_bytes: bytes | None
) -> ModelVersion:
    """Register the round's result through the registry (validated, stored, signed)."""
    with transaction.atomic():
        base = rnd.base_version
        version = version_create(
            family=job.family,
            weights=weights_bytes,
            onnx=onnx_bytes,
            program=version_program(version=base),
            head=list(base.head or []),
            parent=base,
            source=ModelVersion.Source.FEDERATED,
            source_detail={"job": job.pk, "round": rnd.number},
            arch=base.arch,
            # The parent's program and graph were checked against each other; a new
            # version made by changing weights is checked for its tensors, not run again.
            derived=True,
        )
        # The same graph: boards without PyTorch train it from the base's ORT artifacts.
        ort_training_inherit(version=version, parent=base)
        # The lease check makes the version creation happen once: a worker that lost
        # the lease rolls the version back here.
        claim.renew(version=version)
    return version


def _evaluation(*, version: ModelVersion, dataset: EvaluationDataset, onnx_bytes: bytes) -> Evaluation:
    """The version's report on ``dataset``: the one made before a crash, or a new one."""
    latest = version_latest_evaluation(version)
    if latest is not None and latest.dataset == dataset.name:
        return Evaluation(report=latest, headline=dict(version.metrics or {}))
    return version_evaluate(
        version=version,
        dataset=dataset,
        latency_repeats=int(_setting("ROUND_EVALUATION_LATENCY_REPEATS", 20)),
        onnx_bytes=onnx_bytes,
    )


def _epsilon(*, rnd: FederatedRound, job: FederatedJob) -> float | None:
    if not (job.noise_multiplier > 0 and job.clip_norm is not None):
        return None
    eligible = max(int(rnd.eligible or len(rnd.selected) or 1), len(rnd.selected), 1)
    return epsilon_for(
        noise_multiplier=job.noise_multiplier,
        sample_rate=min(1.0, len(rnd.selected) / eligible),
        steps=rnd.number,
        delta=job.dp_delta,
    )


def federated_evaluation(*, rnd: FederatedRound) -> dict[str, Any] | None:
    """The round's base version as the boards' holdouts judged it, or None without numbers.

    Every board measures the global model it receives on its own holdout before it trains
    (``holdout_<metric>`` with ``holdout_examples`` in its update's metrics): the mean
    weighted by holdout examples, and the spread across boards, since a mean can hide a
    board the model fails.
    """
    spec = rnd.job.family.spec
    key = f"holdout_{spec.primary_metric}"
    values, weights = [], []
    for metrics in ClientUpdate.objects.filter(
        round=rnd, status=ClientUpdate.Status.ACCEPTED, device_id__in=rnd.selected
    ).values_list("metrics", flat=True):
        value, examples = (metrics or {}).get(key), (metrics or {}).get("holdout_examples")
        if isinstance(value, int | float) and isinstance(examples, int | float) and examples >= 1:
            values.append(float(value))
            weights.append(float(examples))
    if not values:
        return None
    v = np.asarray(values)
    w = np.asarray(weights)
    return {
        "metric": spec.primary_metric,
        "value": float((v * w).sum() / w.sum()),
        "devices": len(values),
        "examples": int(w.sum()),
        "min": float(v.min()),
        "max": float(v.max()),
        "std": float(v.std()),
    }


def _record_federated(*, rnd: FederatedRound, job: FederatedJob) -> None:
    """Give the round's base version the federated evaluation its boards sent, if it has none better."""
    detail = federated_evaluation(rnd=rnd)
    if detail is None:
        return
    base = rnd.base_version
    source = FederatedRound.objects.filter(job=job, version=base).first()
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=base.pk)
        if (locked.metrics or {}).get("evaluation") == "central":
            return  # a test set's verdict is not replaced by the boards'
        locked.metrics = {
            **(locked.metrics or {}),
            detail["metric"]: detail["value"],
            "evaluation": "federated",
            "federated_evaluation": detail,
        }
        locked.save(update_fields=["metrics"])
        if source is not None:
            FederatedRound.objects.filter(pk=source.pk).update(
                metric_name=detail["metric"],
                metric=detail["value"],
                evaluation="federated",
                evaluation_detail=detail,
                **({"accuracy": detail["value"]} if detail["metric"] == "accuracy" else {}),
            )
            _consider_best(job=job, version=base, value=detail["value"])


def _consider_best(*, job: FederatedJob, version: ModelVersion, value: float) -> None:
    """Make ``version`` the job's best when its primary metric beats the best so far."""
    spec = job.family.spec
    current = FederatedJob.objects.select_for_update().get(pk=job.pk)
    if current.best_metric is None or spec.better(value, current.best_metric):
        FederatedJob.objects.filter(pk=job.pk).update(
            best_metric=value,
            best_version=version,
            **({"best_accuracy": value} if spec.primary_metric == "accuracy" else {}),
        )


def _open_next_on_commit(*, job_id: int) -> None:
    """Open the job's next round in this worker once the finished round commits
    (``training.round_open``'s work, sent as the task when that fails): the boards wait
    for it, and a message would add a broker hop and a worker pickup."""
    from training.services.rounds import round_open  # rounds imports this module

    run_on_commit("training.round_open", job_id, run=lambda: round_open(job_id=job_id))


def _open_next_now(*, job_id: int) -> None:
    """Open the job's next round at once (the version it starts from is committed); when
    that fails, the finish of this round opens it as usual."""
    from training.services.rounds import round_open  # rounds imports this module

    try:
        round_open(job_id=job_id)
    except DatabaseError:
        logger.warning("job %s: could not open the next round early", job_id, exc_info=True)


def _evaluation_round_finish(*, rnd: FederatedRound, job: FederatedJob, claim: _Claim) -> None:
    """An evaluation round: record what the boards measured on the final version; no training."""
    started = time.monotonic()
    with transaction.atomic():
        _record_federated(rnd=rnd, job=job)
        detail = federated_evaluation(rnd=rnd)
        done = claim.release(
            status=FederatedRound.Status.DONE,
            finished_at=timezone.now(),
            evaluate_s=time.monotonic() - started,
            metric_name=detail["metric"] if detail else "",
            metric=detail["value"] if detail else None,
            evaluation="federated" if detail else "",
            evaluation_detail=detail or {},
        )
        if not done:
            raise LeaseLost(f"round {rnd.pk}: finished elsewhere")
        FederatedJob.objects.filter(id=job.pk).update(consecutive_failures=0)
        emit(
            "federated_round.status",
            {"job": job.pk, "round": rnd.number, "status": FederatedRound.Status.DONE},
        )
        _open_next_on_commit(job_id=job.pk)


def _evaluate_and_finish(*, rnd: FederatedRound, job: FederatedJob, claim: _Claim) -> None:
    """Register the round's version, evaluate it (centrally when the family has a test set),
    credit the base version with the boards' holdout numbers, and open the next round."""
    started = time.monotonic()
    spec = job.family.spec
    weights_bytes, weights = _result(rnd)
    version = rnd.version
    # The round's graph is the base version's with the new weights written in by name.
    onnx_bytes = onnx_with_weights(version_onnx(version=rnd.base_version), weights)
    if version is None:
        version = _register(rnd=rnd, job=job, claim=claim, weights_bytes=weights_bytes, onnx_bytes=onnx_bytes)
    dataset = evaluation_dataset(family=job.family)
    if dataset is not None and rnd.kind == FederatedRound.Kind.TRAIN and rnd.number < job.rounds:
        # The next round trains from this version whatever its score: open it now, so the
        # boards train while the server evaluates (round_open lets it past this round).
        _open_next_now(job_id=job.pk)
    fields: dict[str, Any] = {}
    if dataset is not None:
        headline = _evaluation(version=version, dataset=dataset, onnx_bytes=onnx_bytes).headline
        value = float(headline[spec.primary_metric])
        fields = {
            "metric_name": spec.primary_metric,
            "metric": value,
            "evaluation": "central",
            "loss": float(headline["loss"]),
        }
        if spec.task == "classification":
            report = version_latest_evaluation(version)
            fields["accuracy"] = value
            fields["confusion"] = (report.report if report else {}).get("confusion_matrix", [])
        ModelVersion.objects.filter(pk=version.pk).update(
            metrics={**(ModelVersion.objects.get(pk=version.pk).metrics or {}), "evaluation": "central"}
        )
    claim.renew()  # export and evaluation take a while; the holder must still be this worker
    with transaction.atomic():
        done = claim.release(
            status=FederatedRound.Status.DONE,
            finished_at=timezone.now(),
            epsilon=_epsilon(rnd=rnd, job=job),
            evaluate_s=time.monotonic() - started,
            **fields,
        )
        if not done:
            raise LeaseLost(f"round {rnd.pk}: finished elsewhere")
        job_updates: dict[str, Any] = {"consecutive_failures": 0}
        if rnd.server_state_path:
            job_updates["server_state_path"] = rnd.server_state_path
        FederatedJob.objects.filter(id=job.pk).update(**job_updates)
        if "metric" in fields:
            _consider_best(job=job, version=version, value=fields["metric"])
        # The boards measured the base version on their holdouts before training on it.
        _record_federated(rnd=rnd, job=job)
        emit(
            "federated_round.status",
            {
                "job": job.pk,
                "round": rnd.number,
                "status": FederatedRound.Status.DONE,
                **({"accuracy": fields["metric"]} if fields.get("metric_name") == "accuracy" else {}),
                **({"metric": fields["metric"]} if "metric" in fields else {}),
            },
        )
        _open_next_on_commit(job_id=job.pk)
    partial = PartialAggregate.objects.filter(round=rnd).first()
    if partial is not None:
        storage.delete_quietly(name=partial.path)
    shards_cleanup(rnd=rnd)
