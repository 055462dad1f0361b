"""Lost messages: every training task is recovered from the rows alone, by
``training.rounds_tick`` (opening and closing rounds) or by the sweep ``core.sweep``
(aggregations). A message is "lost" here by not running the on-commit callback that sends it
(or by a broker that refuses it); the tick then finds the work, and what it re-sends is
delivered by hand to see the work done."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from tests.training.federated.conftest import Fleet, make_fleet, make_job, upload_deltas

pytestmark = pytest.mark.django_db

TRAINING_TASKS = (
    "training.round_open",
    "training.round_close",
    "training.round_aggregate",
    "training.shard_aggregate",
)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """What the tick re-sends, recorded instead of going to the broker."""
    from training.services import rounds

    messages: list[tuple[str, tuple[Any, ...]]] = []

    def record(task_name: str, *args: Any, countdown: float | None = None) -> bool:
        messages.append((task_name, args))
        return True

    monkeypatch.setattr(rounds, "send_now", record)
    yield messages


def _deliver(messages: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Run the re-sent tasks as a worker would."""
    from training import tasks

    by_name = {t.name: t for t in (tasks.round_open, tasks.round_close, tasks.round_aggregate)}
    for name, args in messages:
        by_name[name](*args)
    messages.clear()


def _start(fleet: Fleet, django_capture_on_commit_callbacks: Any, **fields: Any) -> Any:
    """A started job whose first ``round_open`` message is lost."""
    from training import services

    job = make_job(fleet, **fields)
    with django_capture_on_commit_callbacks(execute=False) as lost:
        services.job_start(job_id=job.pk, actor=None)
    assert len(lost) >= 1
    return job


def _upload_all(fleet: Fleet, rnd: Any, django_capture_on_commit_callbacks: Any) -> None:
    """Every selected device sends a delta; the round_close the last one sends is lost."""
    with django_capture_on_commit_callbacks(execute=False):
        upload_deltas(fleet, rnd)


def test_every_training_task_is_recovered_by_the_tick_on_the_beat(settings: Any) -> None:
    from celery import current_app

    from core.dispatch import recoveries
    from training import tasks  # noqa: F401  (registers the tasks)

    declared = recoveries()
    names = {n for n in current_app.tasks if n.startswith("training.")} - {"training.rounds_tick"}
    assert names == set(TRAINING_TASKS)
    by = {name: declared[name].by for name in names}
    assert by == {
        "training.round_open": "training.rounds_tick",
        "training.round_close": "training.rounds_tick",
        "training.round_aggregate": "core.sweep",
        "training.shard_aggregate": "core.sweep",
    }
    assert all(declared[name].how for name in names)
    scheduled = {entry["task"] for entry in settings.CELERY_BEAT_SCHEDULE.values()}
    assert {"training.rounds_tick", "core.sweep"} <= scheduled


def test_lost_round_open_is_recovered(django_capture_on_commit_callbacks: Any) -> None:
    from training import services
    from training.models import FederatedRound

    fleet = make_fleet(n_devices=3)
    job = _start(fleet, django_capture_on_commit_callbacks)
    assert not FederatedRound.objects.filter(job=job).exists()
    assert services.rounds_tick()["reopened"] == 1
    rnd = FederatedRound.objects.get(job=job)
    assert rnd.status == "collecting" and rnd.eligible == 3 and len(rnd.selected) == 3


def test_broker_down_at_job_start_is_recovered(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    from celery import current_app

    from training import services
    from training.models import FederatedJob, FederatedRound

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker down")

    fleet = make_fleet(n_devices=3)
    job = make_job(fleet)
    monkeypatch.setattr(current_app, "send_task", refuse)
    with django_capture_on_commit_callbacks(execute=True):
        services.job_start(job_id=job.pk, actor=None)  # the write stands; the send is logged
    assert FederatedJob.objects.get(pk=job.pk).status == "running"
    assert not FederatedRound.objects.filter(job=job).exists()
    services.rounds_tick()
    assert FederatedRound.objects.get(job=job).status == "collecting"


def test_lost_round_close_is_recovered_before_the_deadline(
    django_capture_on_commit_callbacks: Any, sent: list[Any]
) -> None:
    from training import services
    from training.models import FederatedRound

    fleet = make_fleet(n_devices=3)
    job = _start(fleet, django_capture_on_commit_callbacks, round_deadline_s=3600)
    rnd = services.round_open(job_id=job.pk)
    _upload_all(fleet, rnd, django_capture_on_commit_callbacks)
    assert FederatedRound.objects.get(pk=rnd.pk).status == "collecting"
    assert services.rounds_tick()["closed"] == 1
    rnd = FederatedRound.objects.get(pk=rnd.pk)
    assert rnd.status == "aggregating" and rnd.participants == 3 and rnd.collect_s is not None


def test_round_with_missing_devices_waits_for_its_deadline(django_capture_on_commit_callbacks: Any) -> None:
    from training import services
    from training.models import ClientUpdate, FederatedRound

    fleet = make_fleet(n_devices=3)
    job = _start(fleet, django_capture_on_commit_callbacks)
    rnd = services.round_open(job_id=job.pk)
    _upload_all(fleet, rnd, django_capture_on_commit_callbacks)
    ClientUpdate.objects.filter(round=rnd, device=fleet.devices[2]).delete()
    assert services.rounds_tick()["closed"] == 0
    assert FederatedRound.objects.get(pk=rnd.pk).status == "collecting"


def _sweep() -> dict[str, list[Any]]:
    from core.sweep import sweep

    return sweep()


def test_lost_aggregate_message_is_re_driven_by_the_sweep_after_the_grace(
    django_capture_on_commit_callbacks: Any, sent: list[Any], settings: Any
) -> None:
    from training import services
    from training.models import FederatedJob, FederatedRound

    settings.SWEEP_GRACE_S = 30
    fleet = make_fleet(n_devices=3)
    job = _start(fleet, django_capture_on_commit_callbacks, rounds=1)
    rnd = services.round_open(job_id=job.pk)
    _upload_all(fleet, rnd, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False):
        assert services.round_close(round_id=rnd.pk).status == "aggregating"  # its message is lost
    # Just closed: the message may still be on its way, so nothing is sent yet.
    assert _sweep()["training.rounds"] == [] and sent == []
    services.rounds_tick()  # the tick leaves aggregations to the sweep
    assert sent == []
    FederatedRound.objects.filter(pk=rnd.pk).update(closed_at=timezone.now() - timedelta(seconds=31))
    assert _sweep()["training.rounds"] == [rnd.pk]
    assert sent == [("training.round_aggregate", (rnd.pk,))]
    # Sent again at most once per grace: a round waiting behind a busy worker does not
    # pile up a message per sweep.
    assert _sweep()["training.rounds"] == []
    FederatedRound.objects.filter(pk=rnd.pk).update(redriven_at=timezone.now() - timedelta(seconds=31))
    assert _sweep()["training.rounds"] == [rnd.pk]
    _deliver(sent)
    rnd = FederatedRound.objects.get(pk=rnd.pk)
    assert rnd.status == "done" and rnd.version is not None and rnd.lease_expires_at is None
    assert FederatedJob.objects.get(pk=job.pk).best_version == rnd.version
    assert _sweep()["training.rounds"] == [] and sent == []  # done: nothing more to send


def test_dead_worker_is_replaced_once_its_lease_expires(
    django_capture_on_commit_callbacks: Any, sent: list[Any], settings: Any
) -> None:
    from training import services
    from training.models import FederatedRound
    from training.services import AGGREGATION_LEASE

    settings.SWEEP_GRACE_S = 0
    fleet = make_fleet(n_devices=3)
    job = _start(fleet, django_capture_on_commit_callbacks)
    rnd = services.round_open(job_id=job.pk)
    _upload_all(fleet, rnd, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False):
        services.round_close(round_id=rnd.pk)
    # A worker claims the round and dies.
    assert AGGREGATION_LEASE.claim(rnd.pk) is not None
    assert services.round_aggregate(round_id=rnd.pk) is None  # held: a duplicate does nothing
    # A live lease is never re-sent, however long ago the round closed.
    FederatedRound.objects.filter(pk=rnd.pk).update(closed_at=timezone.now() - timedelta(hours=1))
    assert _sweep()["training.rounds"] == [] and sent == []
    FederatedRound.objects.filter(pk=rnd.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert _sweep()["training.rounds"] == [rnd.pk]
    _deliver(sent)
    assert FederatedRound.objects.get(pk=rnd.pk).status == "done"


def test_an_evaluating_round_whose_worker_died_is_re_driven(
    django_capture_on_commit_callbacks: Any, sent: list[Any]
) -> None:
    """Aggregated, then the worker died while it registered and evaluated the version."""
    from training import services
    from training.models import FederatedRound

    fleet = make_fleet(n_devices=3)
    job = _start(fleet, django_capture_on_commit_callbacks, rounds=1)
    rnd = services.round_open(job_id=job.pk)
    _upload_all(fleet, rnd, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False):
        services.round_close(round_id=rnd.pk)
    FederatedRound.objects.filter(pk=rnd.pk).update(
        status="evaluating", lease_expires_at=timezone.now() + timedelta(seconds=60)
    )
    assert _sweep()["training.rounds"] == []
    FederatedRound.objects.filter(pk=rnd.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert _sweep()["training.rounds"] == [rnd.pk]
    assert sent == [("training.round_aggregate", (rnd.pk,))]


def test_a_refused_re_send_is_tried_again_by_the_next_sweep(
    django_capture_on_commit_callbacks: Any, monkeypatch: pytest.MonkeyPatch, settings: Any
) -> None:
    from celery import current_app

    from training import services

    settings.SWEEP_GRACE_S = 0
    fleet = make_fleet(n_devices=3)
    job = _start(fleet, django_capture_on_commit_callbacks, rounds=1)
    rnd = services.round_open(job_id=job.pk)
    _upload_all(fleet, rnd, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False):
        services.round_close(round_id=rnd.pk)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr(current_app, "send_task", refuse)
    assert _sweep()["training.rounds"] == []  # logged, not raised
    sent: list[Any] = []
    monkeypatch.setattr(current_app, "send_task", lambda name, args, **_: sent.append((name, args)))
    assert _sweep()["training.rounds"] == [rnd.pk]
    assert sent == [("training.round_aggregate", [rnd.pk])]


def test_lost_open_of_the_next_round_is_recovered(
    django_capture_on_commit_callbacks: Any, sent: list[Any]
) -> None:
    from training import services
    from training.models import FederatedRound

    # Without a test set nothing is evaluated centrally, so the next round is opened only
    # when the round is done, by the on-commit step that is lost here.
    fleet = make_fleet(n_devices=3, test_set=False)
    job = _start(fleet, django_capture_on_commit_callbacks, rounds=2)
    first = services.round_open(job_id=job.pk)
    _upload_all(fleet, first, django_capture_on_commit_callbacks)
    with django_capture_on_commit_callbacks(execute=False):
        services.round_close(round_id=first.pk)
        first = services.round_aggregate(round_id=first.pk)  # the next round_open it sends is lost
    assert first.status == "done"
    assert services.rounds_tick()["reopened"] == 1
    second = FederatedRound.objects.get(job=job, number=2)
    assert second.status == "collecting" and second.base_version_id == first.version_id


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    """Every message sent to the broker through ``core.dispatch``, recorded, not sent."""
    from core import dispatch

    messages: list[tuple[str, tuple[Any, ...]]] = []

    def record(task_name: str, *args: Any, countdown: float | None = None) -> bool:
        messages.append((task_name, args))
        return True

    monkeypatch.setattr(dispatch, "send_now", record)
    yield messages


def test_the_last_answer_closes_the_round_and_its_aggregation_opens_the_next_without_a_hop(
    django_capture_on_commit_callbacks: Any, broker: list[Any]
) -> None:
    from training import services
    from training.models import FederatedRound

    fleet = make_fleet(n_devices=3)
    job = _start(fleet, django_capture_on_commit_callbacks, rounds=2)
    first = services.round_open(job_id=job.pk)
    with django_capture_on_commit_callbacks(execute=True):
        upload_deltas(fleet, first)
    first.refresh_from_db()
    # Closed in the request that brought the last update; only the aggregation is sent.
    assert first.status == "aggregating" and first.closed_at is not None
    assert broker == [("training.round_aggregate", (first.pk,))]
    broker.clear()
    with django_capture_on_commit_callbacks(execute=True):
        first = services.round_aggregate(round_id=first.pk)
    assert first.status == "done"
    # The worker that finished the round opened the next one itself.
    second = FederatedRound.objects.get(job=job, number=2)
    assert second.status == "collecting" and second.base_version_id == first.version_id
    assert [name for name, _ in broker if name in ("training.round_open", "training.round_close")] == []


def test_a_close_that_fails_in_place_is_sent_to_a_worker(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any, broker: list[Any]
) -> None:
    from django.db import OperationalError

    from training import services
    from training.services import updates

    def locked(*, round_id: int) -> None:
        raise OperationalError("database is locked")

    monkeypatch.setattr(updates, "round_close", locked)
    fleet = make_fleet(n_devices=3)
    job = _start(fleet, django_capture_on_commit_callbacks)
    rnd = services.round_open(job_id=job.pk)
    with django_capture_on_commit_callbacks(execute=True):
        upload_deltas(fleet, rnd)
    rnd.refresh_from_db()
    assert rnd.status == "collecting"
    assert broker == [("training.round_close", (rnd.pk,))]


def test_the_next_round_trains_while_the_version_is_evaluated(
    monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any, broker: list[Any]
) -> None:
    from training import services
    from training.models import FederatedJob, FederatedRound
    from training.services import aggregation

    evaluate = aggregation._evaluation
    seen: list[list[tuple[int, str, int | None]]] = []

    def watched(**kwargs: Any) -> Any:
        # What the job's rounds look like while the central evaluation runs (then it runs).
        rounds = FederatedRound.objects.order_by("number").values_list("number", "status", "base_version_id")
        seen.append(list(rounds))
        return evaluate(**kwargs)

    monkeypatch.setattr(aggregation, "_evaluation", watched)
    fleet = make_fleet(n_devices=3)
    job = _start(fleet, django_capture_on_commit_callbacks, rounds=2)
    first = services.round_open(job_id=job.pk)
    with django_capture_on_commit_callbacks(execute=True):
        upload_deltas(fleet, first)
    with django_capture_on_commit_callbacks(execute=True):
        first = services.round_aggregate(round_id=first.pk)
    assert first.status == "done" and first.accuracy is not None
    base = fleet.version.pk
    assert seen == [[(1, "evaluating", base), (2, "collecting", first.version_id)]]
    second = FederatedRound.objects.get(job=job, number=2)
    with django_capture_on_commit_callbacks(execute=True):
        upload_deltas(fleet, second)
    with django_capture_on_commit_callbacks(execute=True):
        last = services.round_aggregate(round_id=second.pk)
    # The last round is evaluated before the job ends: nothing opens early after it.
    assert last is not None and last.status == "done"
    assert seen[1] == [(1, "done", base), (2, "evaluating", first.version_id)]
    assert FederatedJob.objects.get(pk=job.pk).status == "succeeded"
