"""Partial sums across workers: a large round in shards gives one worker's result, each
shard is committed once, a dead shard worker's shard is resumed, and rules that cannot
merge stay on one worker."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.utils import timezone

from devices_agent.codecs import decode_tensors, encode_delta
from tests.training.federated.conftest import Fleet, make_fleet, make_job

pytestmark = pytest.mark.django_db

N_DEVICES = 10


@pytest.fixture
def sharded(settings: Any) -> Any:
    """10 updates in shards of 3 (4 shards)."""
    settings.AGGREGATION_SHARD_MIN_UPDATES = 4
    settings.AGGREGATION_SHARD_SIZE = 3
    settings.ROUND_CHECKPOINT_EVERY = 2
    return settings


def _closed_round(fleet: Fleet, **fields: Any) -> Any:
    """A round of a started job whose ten devices sent deltas of different weights."""
    from training import selectors, services

    job = make_job(fleet, min_clients=N_DEVICES, quorum=N_DEVICES, rounds=1, **fields)
    services.job_start(job_id=job.pk, actor=None)
    rnd = services.round_open(job_id=job.pk)
    assert rnd is not None
    weights = selectors.round_weights(rnd=rnd)
    rng = np.random.default_rng(7)
    devices = {str(d.pk): d for d in fleet.devices}
    for i, device_id in enumerate(rnd.selected):
        delta = {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in weights.items()}
        services.update_receive(
            round_id=rnd.pk,
            device=devices[device_id],
            body=encode_delta(delta, codec="none").data,
            num_examples=str(5 + 7 * i),
            metrics=None,
        )
    closed = services.round_close(round_id=rnd.pk)
    assert closed is not None and closed.status == "aggregating"
    return closed


def _one_worker(rnd: Any) -> dict[str, np.ndarray]:
    """What one worker computes: the job's strategy over every update, in id order."""
    from training import selectors, storage
    from training.aggregation import UpdateFileReader, make_aggregator
    from training.models import ClientUpdate, FederatedRound
    from training.services import job_privacy

    rnd = FederatedRound.objects.select_related("job").get(pk=rnd.pk)
    key = bytes(rnd.noise_key) if rnd.noise_key else None
    agg = make_aggregator(
        rnd.job.strategy,
        global_weights=selectors.round_weights(rnd=rnd),
        privacy=job_privacy(job=rnd.job, noise_key=key),
        **(rnd.job.strategy_params or {}),
    )
    reader = UpdateFileReader()
    for update in ClientUpdate.objects.filter(round=rnd, status="accepted").order_by("id"):
        with storage.local_paths(names=[update.path]) as (path,):
            # A copy: order statistics keep what they accept, and the reader reuses its buffer.
            delta = {k: v.copy() for k, v in reader.read(path).items()}
            agg.accept(delta, weight=float(update.num_examples), update_id=str(update.pk))
    return agg.finalize()


def _stored_result(rnd: Any) -> dict[str, np.ndarray]:
    from training import storage

    data = storage.read_bytes(
        name=f"{storage.round_dir(job_id=rnd.job_id, round_number=rnd.number)}/result.safetensors"
    )
    tensors, _ = decode_tensors(data)
    return tensors


def _max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)).max()) for k in b)


MERGEABLE = [
    ("fedavg", {}, {}),
    ("fedprox", {}, {"prox_mu": 0.01}),
    ("fedadam", {"eta": 0.01}, {}),
    ("fedyogi", {"eta": 0.01}, {}),
    ("fedavg", {}, {"clip_norm": 0.5, "norm_slack": 3.0}),
    ("fedavg", {}, {"clip_norm": 0.5, "norm_slack": 3.0, "noise_multiplier": 0.8}),
    ("fedadam", {"eta": 0.01}, {"clip_norm": 0.5, "norm_slack": 3.0, "noise_multiplier": 0.8}),
]


@pytest.mark.parametrize(("strategy", "params", "fields"), MERGEABLE)
def test_sharded_round_equals_one_worker(
    sharded: Any, strategy: str, params: dict[str, Any], fields: dict[str, Any]
) -> None:
    from training import services
    from training.models import AggregationShard

    fleet = make_fleet(n_devices=N_DEVICES, name=f"shard-{strategy}")
    rnd = _closed_round(fleet, strategy=strategy, strategy_params=params, **fields)
    seen: list[int] = []
    done = services.round_aggregate(round_id=rnd.pk, on_update=seen.append)
    assert done is not None and done.status == "done", done and done.failure_reason
    shards = list(AggregationShard.objects.filter(round=rnd).order_by("index"))
    assert [len(s.update_ids) for s in shards] == [3, 3, 3, 1]
    assert all(s.status == "done" and s.claims == 1 and s.lease_expires_at is None for s in shards)
    assert sorted(seen) == sorted(uid for s in shards for uid in s.update_ids)  # each update once
    expected = _one_worker(rnd)
    assert _max_abs_diff(_stored_result(rnd), expected) <= 1e-6
    if strategy in ("fedadam", "fedyogi"):
        assert done.server_state_path


def test_a_dead_shard_worker_is_resumed_from_its_checkpoint(sharded: Any) -> None:
    from training import services
    from training.models import AggregationShard, FederatedRound

    class Crash(Exception):
        pass

    fleet = make_fleet(n_devices=N_DEVICES, name="shard-crash")
    rnd = _closed_round(fleet)
    seen: list[int] = []

    def boom(update_id: int) -> None:
        seen.append(update_id)
        if len(seen) == 6:  # shard 0 done; shard 1 checkpointed after 2 of its 3 updates
            raise Crash

    with pytest.raises(Crash):
        services.round_aggregate(round_id=rnd.pk, on_update=boom)
    first, second = AggregationShard.objects.filter(round=rnd).order_by("index")[:2]
    assert first.status == "done" and second.status == "pending" and len(second.accepted_ids) == 2
    # While the shard's lease is fresh nobody else may take it.
    assert services.shard_aggregate(shard_id=second.pk) is None
    AggregationShard.objects.filter(pk=second.pk).update(
        lease_expires_at=timezone.now() - timedelta(seconds=1)
    )
    # Another worker takes the shard over and sums only what its checkpoint lacks.
    counted: list[int] = []
    resumed = services.shard_aggregate(shard_id=second.pk, on_update=counted.append)
    assert resumed is not None and resumed.status == "done" and resumed.claims == 2
    assert counted == [second.update_ids[2]]
    # A duplicate delivery of a committed shard changes nothing.
    assert services.shard_aggregate(shard_id=second.pk) is None
    FederatedRound.objects.filter(pk=rnd.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    done = services.round_aggregate(round_id=rnd.pk)
    assert done is not None and done.status == "done"
    assert AggregationShard.objects.get(pk=first.pk).claims == 1  # committed once, never redone
    assert _max_abs_diff(_stored_result(rnd), _one_worker(rnd)) <= 1e-6


def test_shards_are_sent_as_one_group_after_the_commit(
    sharded: Any, django_capture_on_commit_callbacks: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from core import dispatch
    from training import services
    from training.models import AggregationShard

    groups: list[tuple[str, list[list[Any]]]] = []

    def record(name: str, lists: list[list[Any]]) -> bool:
        groups.append((name, lists))
        return True

    monkeypatch.setattr(dispatch, "send_group_now", record)
    fleet = make_fleet(n_devices=N_DEVICES, name="shard-group")
    rnd = _closed_round(fleet)
    with django_capture_on_commit_callbacks(execute=True):
        done = services.round_aggregate(round_id=rnd.pk)
    assert done is not None and done.status == "done"
    ids = [[s.pk] for s in AggregationShard.objects.filter(round=rnd).order_by("index")]
    assert groups == [("training.shard_aggregate", ids)]


def test_rules_that_cannot_merge_stay_on_one_worker(sharded: Any, caplog: pytest.LogCaptureFixture) -> None:
    from training import services
    from training.models import AggregationShard

    fleet = make_fleet(n_devices=N_DEVICES, name="shard-median")
    rnd = _closed_round(fleet, strategy="median")
    with caplog.at_level(logging.INFO, logger="training.services.aggregation"):
        done = services.round_aggregate(round_id=rnd.pk)
    assert done is not None and done.status == "done"
    assert not AggregationShard.objects.filter(round=rnd).exists()
    assert any("one worker" in r.message and "cannot be merged" in r.message for r in caplog.records)
    assert _max_abs_diff(_stored_result(rnd), _one_worker(rnd)) <= 1e-6


def test_small_rounds_are_not_sharded(sharded: Any) -> None:
    from training import services
    from training.models import AggregationShard

    sharded.AGGREGATION_SHARD_MIN_UPDATES = 11
    fleet = make_fleet(n_devices=N_DEVICES, name="shard-small")
    rnd = _closed_round(fleet)
    done = services.round_aggregate(round_id=rnd.pk)
    assert done is not None and done.status == "done"
    assert not AggregationShard.objects.filter(round=rnd).exists()


def test_a_shard_of_a_round_no_longer_aggregating_is_left_alone(sharded: Any) -> None:
    from training import services
    from training.models import AggregationShard, FederatedRound

    fleet = make_fleet(n_devices=N_DEVICES, name="shard-late")
    rnd = _closed_round(fleet)
    done = services.round_aggregate(round_id=rnd.pk)
    assert done is not None and done.status == "done"
    # A late duplicate of a shard message, after the round moved on, claims nothing.
    shard = AggregationShard.objects.filter(round=rnd).first()
    assert shard is not None
    AggregationShard.objects.filter(pk=shard.pk).update(status="pending", lease_expires_at=None)
    assert FederatedRound.objects.get(pk=rnd.pk).status == "done"
    assert services.shard_aggregate(shard_id=shard.pk) is None
    assert AggregationShard.objects.get(pk=shard.pk).claims == 1
