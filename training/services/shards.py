"""Partial sums across workers: a large round's updates in shards, each on any worker.

A round of a *mergeable* strategy (the weighted-mean family: FedAvg, FedProx, FedAdam,
FedYogi; see ``Aggregator.mergeable``) with at least ``AGGREGATION_SHARD_MIN_UPDATES``
accepted updates is cut into :class:`~training.models.AggregationShard` rows of
``AGGREGATION_SHARD_SIZE`` updates (in id order, fixed once). The round's worker, which
holds the round's lease, sends every pending shard as one Celery group of
``training.shard_aggregate`` tasks and then works on the shards itself until none is
left, so a round never waits on a queue that has no free worker: with one worker it
does every shard, with more the others take shards in parallel. When every shard is
done it merges their partial sums in shard order through the strategy's ``merge`` and
finalizes as for one worker (the privacy noise and the server optimiser step happen
there, once).

Exactly once: a worker claims a shard with :data:`SHARD_LEASE` (``core.leases``),
checkpoints its running sum every ``ROUND_CHECKPOINT_EVERY`` updates together with the
ids in it, and commits its partial sum with one conditional update under the lease, so
a shard's result is committed once; a worker killed mid-shard leaves an expired lease
and a checkpoint, and the next worker to claim the shard resumes from it. The reduce
runs under the round's lease (one worker) and reads only committed partial sums, so a
reduce repeated after a crash gives the same result. A killed round worker is replaced
through the round's own recovery (the sweep, ``core.sweep``), and the new one sends the
shards still pending again.

Rules that cannot merge (order statistics: median, trimmed mean, Krum need every update
at once) stay on one worker; the reason is logged.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from core.dispatch import enqueue_group_on_commit
from core.leases import Lease, LeaseLost
from training import selectors, storage
from training.aggregation import (
    Aggregator,
    UpdateFileReader,
    Weights,
    make_aggregator,
    partial_from_bytes,
)
from training.models import AggregationShard, ClientUpdate, FederatedJob, FederatedRound
from training.services.jobs import job_privacy

logger = logging.getLogger(__name__)


class _ShardLost(Exception):
    """This worker's lease on a shard was taken over (the round's lease is another matter)."""


def _setting(name: str, default: Any) -> Any:
    return getattr(settings, name, default)


SHARD_LEASE = Lease(
    model=AggregationShard,
    field="lease_expires_at",
    seconds=lambda: float(_setting("AGGREGATION_SHARD_LEASE_S", 60.0)),
)


def shard_size_for(*, agg: Aggregator, num_updates: int) -> tuple[int, str]:
    """How many updates per shard for this round (0: one worker), and why."""
    size = max(1, int(_setting("AGGREGATION_SHARD_SIZE", 128)))
    minimum = max(1, int(_setting("AGGREGATION_SHARD_MIN_UPDATES", 256)))
    if num_updates < minimum or num_updates <= size:
        return 0, f"{num_updates} update(s), below the shard threshold ({minimum}, shards of {size})"
    if not agg.mergeable:
        return 0, (
            f"{agg.name} cannot be merged from partial sums (an order statistic needs every update at once)"
        )
    return size, f"{num_updates} updates in shards of {size}"


def stream_updates(
    *,
    agg: Aggregator,
    updates: Sequence[ClientUpdate],
    checkpoint: Callable[[], None],
    on_update: Callable[[int], None] | None = None,
) -> None:
    """Accept every update not yet in ``agg`` (weighted by its examples), calling
    ``checkpoint`` every ``ROUND_CHECKPOINT_EVERY`` accepted updates."""
    every = max(1, int(_setting("ROUND_CHECKPOINT_EVERY", 8)))
    delay = float(_setting("ROUND_AGGREGATE_DELAY_S", 0.0))
    since_checkpoint = 0
    reader = UpdateFileReader()
    todo = [u for u in updates if str(u.pk) not in agg.accepted_ids]
    with storage.local_paths(names=[u.path for u in todo]) as paths:
        for update, path in zip(todo, paths, strict=True):
            delta = reader.read(path)
            agg.accept(delta, weight=float(update.num_examples), update_id=str(update.pk))
            del delta  # a view of the reader's buffer, which the next read overwrites
            since_checkpoint += 1
            if on_update is not None:
                on_update(update.pk)
            if delay:
                time.sleep(delay)
            if since_checkpoint >= every:
                checkpoint()
                since_checkpoint = 0


def _folder(rnd: FederatedRound) -> str:
    return storage.round_dir(job_id=rnd.job_id, round_number=rnd.number)


def shards_prepare(*, rnd: FederatedRound, update_ids: list[int], size: int) -> list[AggregationShard]:
    """The round's shards (made once, in id order), with every pending one sent as a group."""
    with transaction.atomic():
        # The round's lease makes this worker the only one here; the unique (round, index)
        # constraint would refuse a second set anyway.
        shards = list(AggregationShard.objects.filter(round=rnd).order_by("index"))
        if not shards:
            ordered = sorted(update_ids)
            shards = AggregationShard.objects.bulk_create(
                AggregationShard(round=rnd, index=i, update_ids=ordered[start : start + size])
                for i, start in enumerate(range(0, len(ordered), size))
            )
            shards = list(AggregationShard.objects.filter(round=rnd).order_by("index"))
        covered = sorted(uid for shard in shards for uid in shard.update_ids)
        if covered != sorted(update_ids):
            raise ValueError("the round's shards do not hold exactly its accepted updates")
        pending = [[s.pk] for s in shards if s.status == AggregationShard.Status.PENDING]
        enqueue_group_on_commit("training.shard_aggregate", pending)
    logger.info("round %s: %d shard(s), %d pending", rnd.pk, len(shards), len(pending))
    return shards


def _shard_aggregator(*, rnd: FederatedRound, job: FederatedJob) -> Aggregator:
    """The round's strategy as a shard sums with it: the same clipping and weights; no
    noise key and no server state, which only the round's finalize uses."""
    return make_aggregator(
        job.strategy,
        global_weights=selectors.round_weights(rnd=rnd),
        privacy=job_privacy(job=job),
        **(job.strategy_params or {}),
    )


def shard_aggregate(
    *,
    shard_id: int,
    on_update: Callable[[int], None] | None = None,
    heartbeat: Callable[[], None] | None = None,
) -> AggregationShard | None:
    """Sum one shard's updates into a committed partial sum (resuming its checkpoint).

    Returns None when another worker holds the shard, it is done already, or its round is
    no longer aggregating. ``heartbeat`` is called at each checkpoint (the round's own
    worker renews the round's lease with it when it sums a shard itself).
    """
    started = time.monotonic()
    token = SHARD_LEASE.claim(
        shard_id,
        where=Q(status=AggregationShard.Status.PENDING, round__status=FederatedRound.Status.AGGREGATING),
        claims=F("claims") + 1,
        worker=f"{socket.gethostname()}:{os.getpid()}"[:200],
    )
    if token is None:
        return None
    holder = {"token": token}
    shard = AggregationShard.objects.select_related("round", "round__job", "round__base_version").get(
        pk=shard_id
    )
    rnd, job = shard.round, shard.round.job
    # Names carry the claim number: a worker that lost the lease can never overwrite the
    # files of the one that took over.
    stem = f"{_folder(rnd)}/shard_{shard.index:05d}_claim{shard.claims}"
    agg = _shard_aggregator(rnd=rnd, job=job)
    if shard.checkpoint_path:
        agg.resume(storage.read_bytes(name=shard.checkpoint_path))
    updates = list(ClientUpdate.objects.filter(pk__in=shard.update_ids).order_by("id"))
    if len(updates) != len(shard.update_ids):
        raise ValueError(f"shard {shard.index} of round {rnd.pk}: updates are missing")
    previous = {"path": shard.checkpoint_path}

    def checkpoint() -> None:
        ids = sorted(agg.accepted_ids)
        name = storage.save_bytes(name=f"{stem}_{len(ids):06d}.safetensors", data=agg.checkpoint())
        try:
            holder["token"] = SHARD_LEASE.renew(
                shard_id, holder["token"], checkpoint_path=name, accepted_ids=ids
            )
        except LeaseLost:
            storage.delete_quietly(name=name)
            raise _ShardLost from None
        if previous["path"] and previous["path"] != name:
            storage.delete_quietly(name=previous["path"])
        previous["path"] = name
        if heartbeat is not None:
            heartbeat()

    try:
        stream_updates(agg=agg, updates=updates, checkpoint=checkpoint, on_update=on_update)
        name = storage.save_bytes(name=f"{stem}.safetensors", data=agg.checkpoint())
        committed = SHARD_LEASE.release(
            shard_id,
            holder["token"],
            status=AggregationShard.Status.DONE,
            path=name,
            accepted_ids=sorted(agg.accepted_ids),
            aggregate_s=time.monotonic() - started,
        )
    except _ShardLost:
        committed = False
    if not committed:
        logger.warning("shard %s of round %s: another worker owns it now", shard.index, rnd.pk)
        return None
    if previous["path"]:
        storage.delete_quietly(name=previous["path"])
    shard.refresh_from_db()
    return shard


def shards_run(
    *,
    rnd: FederatedRound,
    shards: list[AggregationShard],
    heartbeat: Callable[[], None],
    on_update: Callable[[int], None] | None = None,
) -> list[AggregationShard]:
    """Work on the round's shards until every one is done; returns them in index order.

    Called by the round's worker: it claims any free shard itself (one never claimed, or
    one whose worker died: its lease expired) and otherwise waits for the others, calling
    ``heartbeat`` (the round's lease renewal) as it goes.
    """
    poll = float(_setting("AGGREGATION_SHARD_POLL_S", 0.2))
    ids = [s.pk for s in shards]
    while True:
        pending = list(
            AggregationShard.objects.filter(pk__in=ids, status=AggregationShard.Status.PENDING)
            .filter(SHARD_LEASE.free(timezone.now()))
            .order_by("index")
            .values_list("pk", flat=True)
        )
        for shard_id in pending:
            shard_aggregate(shard_id=shard_id, on_update=on_update, heartbeat=heartbeat)
            heartbeat()
        if not AggregationShard.objects.filter(pk__in=ids, status=AggregationShard.Status.PENDING).exists():
            break
        if not pending:
            time.sleep(poll)
            heartbeat()
    return list(AggregationShard.objects.filter(pk__in=ids).order_by("index"))


def shards_reduce(*, agg: Aggregator, shards: list[AggregationShard], global_weights: Weights) -> None:
    """Merge every shard's committed partial sum into ``agg``, in shard order."""
    for shard in shards:
        if shard.status != AggregationShard.Status.DONE or not shard.path:
            raise ValueError(f"shard {shard.index} is not done")
        partial = partial_from_bytes(storage.read_bytes(name=shard.path), global_weights=global_weights)
        if {str(i) for i in shard.update_ids} != partial.accepted_ids:
            raise ValueError(f"shard {shard.index}'s partial sum does not hold exactly its updates")
        agg.merge(partial)


def shards_cleanup(*, rnd: FederatedRound) -> None:
    """Delete the stored partial sums and checkpoints of a finished round's shards."""
    for path, checkpoint in AggregationShard.objects.filter(round=rnd).values_list("path", "checkpoint_path"):
        storage.delete_quietly(name=path)
        storage.delete_quietly(name=checkpoint)
