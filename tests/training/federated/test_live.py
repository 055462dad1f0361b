"""Federated jobs through the real stack: uvicorn, Celery workers on Redis, agents over HTTP."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices_agent.codecs import encode_delta
from tests.training.federated.conftest import Fleet, make_fleet, make_job

pytestmark = pytest.mark.slow


def _wait(predicate: Callable[[], bool], *, timeout: float, what: str, stack: Any = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    logs = "" if stack is None else stack.log("worker")[-3000:]
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


@contextmanager
def _agents(fleet: Fleet, url: str, state_root: Path) -> Iterator[list[Any]]:
    """One thread per device running the device-side trainer against the live server."""
    import base64

    from devices_agent.client import AgentClient
    from devices_agent.data import client_dataset
    from devices_agent.federated import FederatedTrainer, FixedData, run_rounds
    from fleet.models import Device
    from models_registry.signing import signing_public_key_b64

    key = base64.b64decode(signing_public_key_b64())

    stop = threading.Event()
    outcomes: list[Any] = []
    threads = []
    for i, secret in enumerate(fleet.secrets):
        x, y = client_dataset(client_index=i, n_clients=len(fleet.secrets), alpha=0.5, seed=0)
        # What a real agent reports in its heartbeat: rounds weigh an update by it, no more.
        Device.objects.filter(pk=fleet.devices[i].pk).update(
            state={**(fleet.devices[i].state or {}), "local_examples": len(x)}
        )
        trainer = FederatedTrainer(
            client=AgentClient(server_url=url, secret=secret),
            state_dir=state_root / f"dev{i}",
            data=FixedData(x, y),
            public_key=key,
            device_seed=i,
            should_stop=stop.is_set,
        )
        thread = threading.Thread(
            target=run_rounds,
            args=(trainer,),
            kwargs={"stop": stop, "wait_s": 2.0, "on_outcome": outcomes.append},
            daemon=True,
        )
        thread.start()
        threads.append(thread)
    try:
        yield outcomes
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)


def _job_status(job_id: int) -> str:
    from training.models import FederatedJob

    return FederatedJob.objects.get(pk=job_id).status


def test_full_job_end_to_end_over_http_with_server_restart(
    transactional_db: Any, live_stack: Any, tmp_path: Path
) -> None:
    from models_registry.models import ModelVersion
    from training import services
    from training.models import ClientUpdate, FederatedRound

    fleet = make_fleet(n_devices=3, name="live-digits")
    job = make_job(fleet, rounds=3, min_clients=3, quorum=3, local_epochs=2, codec="int8")
    with _agents(fleet, live_stack.url, tmp_path) as outcomes:
        services.job_start(job_id=job.pk, actor=None)
        _wait(lambda: ClientUpdate.objects.filter(round__job=job).exists(), timeout=60, what="a first update")
        # The server restarts mid-round; the agents retry and the round carries on.
        live_stack.restart_web()
        _wait(lambda: _job_status(job.pk) == "succeeded", timeout=180, what="the job", stack=live_stack)
    rounds = list(FederatedRound.objects.filter(job=job).order_by("number"))
    assert [r.status for r in rounds] == ["done", "done", "done"]
    assert all(r.participants == 3 and r.accuracy is not None for r in rounds)
    assert rounds[-1].accuracy > 0.5
    assert all(r.bytes_in > 0 and r.bytes_out > 0 for r in rounds)
    versions = [r.version for r in rounds]
    assert versions[0].parent_id == fleet.version.pk
    assert versions[1].parent_id == versions[0].pk and versions[2].parent_id == versions[1].pk
    assert ModelVersion.objects.filter(family=fleet.family, source="federated").count() == 3
    assert {o.status for o in outcomes} <= {"uploaded", "duplicate"}
    assert sum(o.status == "uploaded" for o in outcomes) >= 9 - 1  # at most one retried upload


def test_worker_killed_mid_aggregation_resumes_once_without_double_counting(
    transactional_db: Any, live_stack: Any
) -> None:
    import httpx
    from django.utils import timezone

    from devices_agent.codecs import decode_tensors
    from models_registry.models import Artifact, ModelVersion
    from training import services
    from training.aggregation import WeightedMeanAggregator
    from training.models import ClientUpdate, FederatedRound, PartialAggregate

    n = 8
    fleet = make_fleet(n_devices=n, name="kill-digits")
    job = make_job(fleet, rounds=1, min_clients=n, quorum=n)
    # Only the slow worker may take the aggregation, so it is the one we kill.
    live_stack.stop("worker")
    live_stack.start_worker(
        "slow",
        concurrency=1,
        # A short lease, renewed at every checkpoint (about once a second here).
        extra_env={
            "ROUND_AGGREGATE_DELAY_S": "0.5",
            "ROUND_CHECKPOINT_EVERY": "2",
            "ROUND_AGGREGATION_LEASE_S": "3",
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
        rng = np.random.default_rng(0)
        global_tensors, _ = decode_tensors(
            httpx.get(
                f"{live_stack.url}/api/agent/v1/rounds/{rnd.pk}/weights",
                headers={"Authorization": f"Device {fleet.secrets[0]}"},
            ).content
        )
        deltas = []
        for i, secret in enumerate(fleet.secrets):
            delta = {
                k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in global_tensors.items()
            }
            deltas.append(delta)
            response = httpx.post(
                f"{live_stack.url}/api/agent/v1/rounds/{rnd.pk}/update",
                content=encode_delta(delta, codec="none").data,
                headers={"Authorization": f"Device {secret}", "X-Num-Examples": str(10 + i)},
            )
            assert response.status_code == 201, response.text
        _wait(
            lambda: len(getattr(PartialAggregate.objects.filter(round=rnd).first(), "accepted_ids", [])) >= 2,
            timeout=60,
            what="a checkpoint",
        )
        live_stack.kill("slow")
        checkpoint = PartialAggregate.objects.get(round=rnd).accepted_ids
        assert 2 <= len(checkpoint) < n
        live_stack.start_worker("fresh", concurrency=1)
        _wait(
            lambda: FederatedRound.objects.get(pk=rnd.pk).lease_expires_at < timezone.now(),
            timeout=10,
            what="the dead worker's lease to expire",
        )
        assert services.rounds_redrive(now=timezone.now(), grace=timedelta(seconds=120)) == [rnd.pk]
        _wait(
            lambda: FederatedRound.objects.get(pk=rnd.pk).status == "done",
            timeout=120,
            what="the resumed aggregation",
            stack=live_stack,
        )
    finally:
        live_stack.stop("fresh")
        live_stack.kill("slow")
        live_stack.start_worker()
    rnd = FederatedRound.objects.get(pk=rnd.pk)
    assert ModelVersion.objects.filter(family=fleet.family, source="federated").count() == 1
    # A clean, uninterrupted aggregation of the same updates in the same order.
    clean = WeightedMeanAggregator(global_weights=global_tensors)
    for update in ClientUpdate.objects.filter(round=rnd).order_by("id"):
        index = [str(d.pk) for d in fleet.devices].index(str(update.device_id))
        clean.accept(deltas[index], weight=float(update.num_examples), update_id=str(update.pk))
    expected = clean.finalize()
    artifact = Artifact.objects.get(version=rnd.version, kind="weights")
    with artifact.file.open("rb") as handle:
        got, _ = decode_tensors(handle.read())
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])


def test_broker_data_lost_mid_round_the_sweep_re_drives_the_round_and_the_job(
    transactional_db: Any, live_stack: Any
) -> None:
    """The broker loses everything it held (FLUSHALL) while a round is aggregating and a
    model job is queued; with a real worker and a real beat, the sweep sends both again
    from the rows, the round closes with a new version and the job finishes."""
    import redis
    from django.conf import settings

    from models_registry import jobs
    from models_registry.models import ModelJob
    from tests.training.federated.conftest import upload_deltas
    from training import services
    from training.models import FederatedRound

    fleet = make_fleet(n_devices=3, name="lost-digits")
    job = make_job(fleet, rounds=1, min_clients=3, quorum=3)
    sweep_env = {"SWEEP_INTERVAL_S": "1", "SWEEP_GRACE_S": "3"}
    broker = redis.Redis.from_url(settings.REDIS_URL)
    # Nobody consumes for now: what is sent waits in the broker, as behind a busy worker.
    live_stack.stop("worker")
    # A message an earlier test's killed worker held may come back from the broker's
    # unacknowledged set at any time: start from an empty broker.
    broker.flushall()
    try:
        services.job_start(job_id=job.pk, actor=None)
        rnd = services.round_open(job_id=job.pk)
        assert rnd is not None and rnd.status == "collecting"
        upload_deltas(fleet, rnd)
        assert services.round_close(round_id=rnd.pk).status == "aggregating"
        evaluation = jobs.job_enqueue(kind="evaluate", version=fleet.version, params={"latency_repeats": 5})
        # The aggregation and the evaluation are in the broker ...
        waiting = [json.loads(m)["headers"]["task"] for m in broker.lrange("ml", 0, -1)]
        assert {"training.round_aggregate", "models_registry.evaluate_version"} <= set(waiting), waiting
        broker.flushall()  # ... and the broker loses them
        assert broker.llen("ml") == 0
        live_stack.start_worker(extra_env=sweep_env)
        live_stack.start_beat(extra_env=sweep_env)
        _wait(
            lambda: FederatedRound.objects.get(pk=rnd.pk).status == "done",
            timeout=120,
            what="the round whose aggregation message was lost",
            stack=live_stack,
        )
        _wait(
            lambda: ModelJob.objects.get(pk=evaluation.pk).status == "succeeded",
            timeout=120,
            what="the model job whose message was lost",
            stack=live_stack,
        )
        _wait(lambda: _job_status(job.pk) == "succeeded", timeout=60, what="the federated job")
    finally:
        live_stack.stop("beat")
        live_stack.stop("worker")
        live_stack.start_worker()
    rnd = FederatedRound.objects.get(pk=rnd.pk)
    assert rnd.version is not None and rnd.participants == 3 and rnd.lease_expires_at is None
    finished = ModelJob.objects.get(pk=evaluation.pk)
    assert finished.attempts == 1 and finished.lease_expires_at is None
    log = live_stack.log("worker")
    assert f"training.rounds re-sent [{rnd.pk}]" in log
    assert f"models_registry.jobs re-sent [{evaluation.pk}]" in log
