"""A large round in shards on real Celery workers: a worker SIGKILLed mid-shard, and the
round still closes once, with one worker's result."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest

from devices_agent.codecs import decode_tensors, encode_delta
from tests.training.federated.conftest import make_fleet, make_job
from tests.training.federated.test_live import _wait

pytestmark = pytest.mark.slow

SHARDS_ENV = {
    "AGGREGATION_SHARD_MIN_UPDATES": "4",
    "AGGREGATION_SHARD_SIZE": "3",
    "ROUND_CHECKPOINT_EVERY": "1",
}


def test_worker_killed_mid_shard_the_round_closes_once_with_the_same_result(
    transactional_db: Any, live_stack: Any
) -> None:
    from django.utils import timezone

    from models_registry.models import Artifact, ModelVersion
    from training import selectors, services
    from training.aggregation import WeightedMeanAggregator
    from training.models import AggregationShard, ClientUpdate, FederatedRound

    n = 10
    fleet = make_fleet(n_devices=n, name="shard-kill")
    job = make_job(fleet, rounds=1, min_clients=n, quorum=n)
    # Only the slow worker runs while the shards are summed, so it is the one we kill.
    live_stack.stop("worker")
    live_stack.start_worker(
        "slow",
        concurrency=1,
        extra_env={
            **SHARDS_ENV,
            "ROUND_AGGREGATE_DELAY_S": "0.4",
            "ROUND_AGGREGATION_LEASE_S": "3",
            "AGGREGATION_SHARD_LEASE_S": "3",
        },
    )
    try:
        services.job_start(job_id=job.pk, actor=None)
        _wait(
            lambda: FederatedRound.objects.filter(job=job, status="collecting").exists(),
            timeout=60,
            what="the round to open",
        )
        rnd = FederatedRound.objects.get(job=job)
        global_weights = selectors.round_weights(rnd=rnd)
        rng = np.random.default_rng(1)
        deltas: dict[str, dict[str, np.ndarray]] = {}
        devices = {str(d.pk): d for d in fleet.devices}
        for i, device_id in enumerate(rnd.selected):
            delta = {
                k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in global_weights.items()
            }
            deltas[device_id] = delta
            services.update_receive(
                round_id=rnd.pk,
                device=devices[device_id],
                body=encode_delta(delta, codec="none").data,
                num_examples=str(10 + 3 * i),
                metrics=None,
            )

        def mid_shard() -> bool:
            shards = list(AggregationShard.objects.filter(round=rnd))
            return any(s.status == "done" for s in shards) and any(
                s.status == "pending" and s.accepted_ids for s in shards
            )

        _wait(mid_shard, timeout=90, what="a shard done and another one checkpointed", stack=live_stack)
        live_stack.kill("slow")
        killed = [
            s.pk
            for s in AggregationShard.objects.filter(round=rnd, status="pending").exclude(accepted_ids=[])
        ]
        done_before = {s.pk: s.path for s in AggregationShard.objects.filter(round=rnd, status="done")}
        assert len(killed) == 1 and done_before
        live_stack.start_worker("fresh", concurrency=1, extra_env=SHARDS_ENV)
        _wait(
            lambda: FederatedRound.objects.get(pk=rnd.pk).lease_expires_at < timezone.now(),
            timeout=10,
            what="the dead worker's lease to expire",
        )
        assert services.rounds_redrive(now=timezone.now(), grace=timedelta(seconds=120)) == [rnd.pk]
        _wait(
            lambda: FederatedRound.objects.get(pk=rnd.pk).status == "done",
            timeout=120,
            what="the round to finish on the fresh worker",
            stack=live_stack,
        )
    finally:
        live_stack.stop("fresh")
        live_stack.kill("slow")
        live_stack.start_worker()
    rnd = FederatedRound.objects.get(pk=rnd.pk)
    assert ModelVersion.objects.filter(family=fleet.family, source="federated").count() == 1
    shards = list(AggregationShard.objects.filter(round=rnd).order_by("index"))
    assert [len(s.update_ids) for s in shards] == [3, 3, 3, 1]
    assert all(s.status == "done" for s in shards)
    for shard in shards:
        if shard.pk in done_before:
            assert shard.claims == 1 and shard.path == done_before[shard.pk]  # committed once
        elif shard.pk in killed:
            assert shard.claims == 2  # re-done by the next worker, from its checkpoint
    # One worker, no crash: every update in id order.
    clean = WeightedMeanAggregator(global_weights=global_weights)
    for update in ClientUpdate.objects.filter(round=rnd).order_by("id"):
        clean.accept(
            deltas[str(update.device_id)], weight=float(update.num_examples), update_id=str(update.pk)
        )
    expected = clean.finalize()
    artifact = Artifact.objects.get(version=rnd.version, kind="weights")
    with artifact.file.open("rb") as handle:
        got, _ = decode_tensors(handle.read())
    diff = max(float(np.abs(got[k].astype(np.float64) - expected[k]).max()) for k in expected)
    assert diff <= 1e-6
