"""Rounds through the services: close at completion or deadline, aggregate, evaluate,
register versions with lineage, resume a crashed aggregation without double counting."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.test import Client
from django.utils import timezone

from devices_agent.codecs import encode_delta
from tests.training.federated.conftest import Fleet, make_fleet, make_job


def _start(fleet: Fleet, **fields: Any) -> Any:
    from training import services

    job = make_job(fleet, **fields)
    services.job_start(job_id=job.pk, actor=None)
    return job


def _train_and_upload(
    fleet: Fleet, rnd: Any, index: int, *, codec: str = "none", prox_mu: float = 0.0
) -> Any:
    """What a device does, through the real device API (Django test client)."""
    from devices_agent.backends import TrainConfig, get_backend
    from devices_agent.codecs import decode_tensors
    from devices_agent.data import client_dataset
    from devices_agent.family import FamilySpec

    client = Client(HTTP_AUTHORIZATION=f"Device {fleet.secrets[index]}")
    task = client.get(f"/api/agent/v1/rounds/{rnd.pk}/task").json()
    tensors, _ = decode_tensors(client.get(task["weights_url"]).content)
    response: Any = client.get(task["program"]["url"])
    program = b"".join(response.streaming_content)
    x, y = client_dataset(client_index=index, n_clients=len(fleet.devices), alpha=0.5, seed=0)
    result = get_backend("torch").train(
        program=program,
        state=tensors,
        spec=FamilySpec.from_dict(task["spec"]),
        x=x,
        y=y,
        config=TrainConfig(
            epochs=task["train"]["epochs"],
            batch_size=task["train"]["batch_size"],
            lr=task["train"]["lr"],
            prox_mu=task["train"]["prox_mu"],
            seed=task["seed"] + index,
            clip_norm=task["clip_norm"],
        ),
        trainable=task["trainable"],
    )
    body = encode_delta(result.delta, codec=task["codec"], topk_fraction=task["topk_fraction"]).data
    return client.post(
        task["update_url"],
        data=body,
        content_type="application/octet-stream",
        HTTP_X_NUM_EXAMPLES=str(result.num_examples),
    )


def _round_weights(version: Any) -> dict[str, np.ndarray]:
    from devices_agent.codecs import decode_tensors
    from models_registry.models import Artifact

    artifact = Artifact.objects.get(version=version, kind="weights")
    with artifact.file.open("rb") as handle:
        tensors, _ = decode_tensors(handle.read())
    return tensors


STRATEGY_CASES = [
    ("fedavg", "none", {}),
    ("fedprox", "fp16", {}),
    ("fedadam", "int8", {"eta": 0.01}),
    ("fedyogi", "topk", {"eta": 0.01}),
    ("median", "none", {}),
    ("trimmed_mean", "int8", {"beta": 0.2}),
    ("krum", "fp16", {"f": 1}),
]


@pytest.mark.parametrize(("strategy", "codec", "params"), STRATEGY_CASES)
def test_every_strategy_and_codec_runs_a_round_to_a_new_version(
    db: Any, strategy: str, codec: str, params: dict[str, Any]
) -> None:
    from training import services
    from training.models import FederatedJob, FederatedRound

    fleet = make_fleet(n_devices=5)
    job = _start(
        fleet,
        strategy=strategy,
        strategy_params=params,
        codec=codec,
        prox_mu=0.01 if strategy == "fedprox" else 0.0,
        rounds=2,
    )
    for number in (1, 2):
        rnd = services.round_open(job_id=job.pk)
        assert rnd is not None and rnd.number == number
        for i in range(5):
            assert _train_and_upload(fleet, rnd, i).status_code == 201
        closed = services.round_close(round_id=rnd.pk)
        assert closed is not None and closed.status == "aggregating"
        done = services.round_aggregate(round_id=rnd.pk)
        assert done is not None and done.status == "done", FederatedRound.objects.get(
            pk=rnd.pk
        ).failure_reason
        assert done.participants == 5 and done.accuracy is not None and 0 <= done.accuracy <= 1
        assert len(done.confusion) == 10 and sum(map(sum, done.confusion)) == 360
        version = done.version
        assert version.source == "federated" and version.source_detail == {"job": job.pk, "round": number}
        assert version.parent_id == rnd.base_version_id
        weights = _round_weights(version)
        assert all(np.all(np.isfinite(w)) for w in weights.values())
    assert services.round_open(job_id=job.pk) is None
    job = FederatedJob.objects.get(pk=job.pk)
    assert job.status == "succeeded" and job.best_version is not None
    second = FederatedRound.objects.get(job=job, number=2)
    first = FederatedRound.objects.get(job=job, number=1)
    assert second.base_version_id == first.version_id  # lineage: round 2 starts from round 1's result
    if strategy in ("fedadam", "fedyogi"):
        assert job.server_state_path


def test_fedavg_round_improves_accuracy_and_exports_onnx(db: Any) -> None:
    from models_registry.models import Artifact
    from training import services

    fleet = make_fleet(n_devices=4)
    job = _start(fleet, rounds=1, local_epochs=5, lr=0.1)
    rnd = services.round_open(job_id=job.pk)
    for i in range(4):
        assert _train_and_upload(fleet, rnd, i).status_code == 201
    services.round_close(round_id=rnd.pk)
    done = services.round_aggregate(round_id=rnd.pk)
    assert done is not None and done.status == "done"
    from devices_agent.backends import get_backend
    from devices_agent.data import load_digits_split
    from models_registry.selectors import version_program

    _, _, x_test, y_test = load_digits_split(seed=0)
    before = get_backend("torch").evaluate(
        program=version_program(version=fleet.version) or b"",
        state=_round_weights(fleet.version),
        spec=fleet.family.spec,
        x=x_test,
        y=y_test,
    )["accuracy"]
    assert done.accuracy is not None and done.accuracy > before + 0.2
    assert done.evaluation == "central" and done.metric == done.accuracy and done.metric_name == "accuracy"
    kinds = set(Artifact.objects.filter(version=done.version).values_list("kind", flat=True))
    assert kinds == {"weights", "onnx", "program"}


def test_device_dropping_out_round_closes_at_deadline_with_the_others(db: Any) -> None:
    from training import services
    from training.models import FederatedRound

    fleet = make_fleet(n_devices=3)
    job = _start(fleet, quorum=2)
    rnd = services.round_open(job_id=job.pk)
    for i in (0, 1):
        assert _train_and_upload(fleet, rnd, i).status_code == 201
    # Device 2 never answers: before the deadline the round keeps waiting for it.
    assert services.round_close(round_id=rnd.pk).status == "collecting"
    FederatedRound.objects.filter(pk=rnd.pk).update(deadline=timezone.now() - timedelta(seconds=1))
    counts = services.rounds_tick()
    assert counts["closed"] == 1
    rnd = FederatedRound.objects.get(pk=rnd.pk)
    assert rnd.status == "aggregating" and rnd.participants == 2 and rnd.dropped == 1
    done = services.round_aggregate(round_id=rnd.pk)
    assert done is not None and done.status == "done"


def test_too_few_participants_at_deadline_fails_round_then_job(db: Any) -> None:
    from training import services
    from training.models import FederatedJob, FederatedRound

    fleet = make_fleet(n_devices=3)
    job = _start(fleet, quorum=2, max_consecutive_failures=2, rounds=5)
    for number in (1, 2):
        rnd = services.round_open(job_id=job.pk)
        assert rnd.number == number
        assert _train_and_upload(fleet, rnd, 0).status_code == 201
        FederatedRound.objects.filter(pk=rnd.pk).update(deadline=timezone.now() - timedelta(seconds=1))
        closed = services.round_close(round_id=rnd.pk)
        assert closed.status == "failed"
        assert "quorum is 2" in closed.failure_reason and closed.participants == 1 and closed.dropped == 2
    job = FederatedJob.objects.get(pk=job.pk)
    assert job.status == "failed" and "2 consecutive rounds failed" in job.error
    assert services.round_open(job_id=job.pk) is None


def test_round_waits_for_enough_eligible_devices(db: Any) -> None:
    from fleet.models import Device
    from training import services

    fleet = make_fleet(n_devices=3)
    Device.objects.filter(pk__in=[d.pk for d in fleet.devices[1:]]).update(status="offline")
    job = _start(fleet, min_clients=2)
    rnd = services.round_open(job_id=job.pk)
    assert rnd.status == "pending" and "1 eligible" in rnd.failure_reason
    Device.objects.filter(pk=fleet.devices[1].pk).update(status="online")
    services.rounds_tick()
    rnd.refresh_from_db()
    assert rnd.status == "collecting" and len(rnd.selected) == 2


def test_selection_is_deterministic_and_respects_fraction_and_policy(db: Any) -> None:
    from fleet.models import UpdatePolicy
    from training import selectors

    fleet = make_fleet(n_devices=6)
    policy = UpdatePolicy.objects.create(name="no-training", training={"allowed": False})
    fleet.devices[0].policy = policy
    fleet.devices[0].save()
    job = make_job(fleet, clients_fraction=0.5, min_clients=2)
    eligible = selectors.eligible_devices(job=job)
    assert len(eligible) == 5 and fleet.devices[0] not in eligible
    first = selectors.round_selection(job=job, number=3)
    again = selectors.round_selection(job=job, number=3)
    assert first == again and len(first[0]) == 3


def test_the_funnel_says_why_each_device_was_left_out(db: Any) -> None:
    """A round that cannot start names the reasons; no board gets a task it cannot run."""
    from fleet.models import Device
    from training import services

    fleet = make_fleet(n_devices=5)
    a, b, c, d, e = fleet.devices
    Device.objects.filter(pk=a.pk).update(status="offline")
    Device.objects.filter(pk=b.pk).update(state={**(b.state or {}), "local_examples": 0})
    # A torch-less board: it reports only a backend the job does not accept.
    Device.objects.filter(pk=c.pk).update(state={**(c.state or {}), "training_backends": ["onnxruntime"]})
    job = _start(fleet, min_clients=3, backends=["torch"])
    rnd = services.round_open(job_id=job.pk)
    assert rnd.status == "pending" and rnd.selected == []
    assert rnd.funnel["group"] == 5 and rnd.funnel["eligible"] == 2
    assert (
        rnd.funnel["offline"] == 1 and rnd.funnel["too_few_examples"] == 1 and rnd.funnel["no_backend"] == 1
    )
    assert "2 eligible, need 3" in rnd.failure_reason and "1 no_backend" in rnd.failure_reason
    Device.objects.filter(pk=a.pk).update(status="online")
    services.rounds_tick()
    rnd.refresh_from_db()
    assert rnd.status == "collecting" and str(c.pk) not in rnd.selected and len(rnd.selected) == 3
    assert rnd.funnel["eligible"] == 3 and rnd.funnel["no_backend"] == 1


class Crash(Exception):
    pass


def test_crashed_aggregation_resumes_from_checkpoint_without_double_counting(db: Any, settings: Any) -> None:
    from training import services
    from training.models import FederatedRound, PartialAggregate

    settings.ROUND_CHECKPOINT_EVERY = 2

    def run(crash_after: int | None) -> dict[str, np.ndarray]:
        fleet = make_fleet(n_devices=6, name=f"digits-{crash_after}")
        job = _start(fleet, min_clients=6, quorum=6)
        rnd = services.round_open(job_id=job.pk)
        for i in range(6):
            assert _train_and_upload(fleet, rnd, i).status_code == 201
        services.round_close(round_id=rnd.pk)
        if crash_after is not None:
            seen: list[int] = []

            def boom(update_id: int) -> None:
                seen.append(update_id)
                if len(seen) == crash_after:
                    raise Crash

            with pytest.raises(Crash):
                services.round_aggregate(round_id=rnd.pk, on_update=boom)
            partial = PartialAggregate.objects.get(round=rnd)
            assert len(partial.accepted_ids) == 4  # checkpoints after 2 and 4 updates
            # While the dead worker's lease is fresh, a duplicate delivery is a no-op.
            assert services.round_aggregate(round_id=rnd.pk) is None
            FederatedRound.objects.filter(pk=rnd.pk).update(
                lease_expires_at=timezone.now() - timedelta(seconds=1)
            )
            counted: list[int] = []
            done = services.round_aggregate(round_id=rnd.pk, on_update=counted.append)
            assert len(counted) == 2  # only the updates after the checkpoint
        else:
            done = services.round_aggregate(round_id=rnd.pk)
        assert done is not None and done.status == "done"
        return _round_weights(done.version)

    clean = run(None)
    resumed = run(5)
    for name in clean:
        np.testing.assert_array_equal(clean[name], resumed[name])


def test_dp_noise_records_epsilon_and_server_clips(db: Any) -> None:
    from training import services

    fleet = make_fleet(n_devices=3)
    job = _start(fleet, clip_norm=1.0, noise_multiplier=0.5, min_clients=3, quorum=3, rounds=1)
    rnd = services.round_open(job_id=job.pk)
    for i in range(3):
        assert _train_and_upload(fleet, rnd, i).status_code == 201
    services.round_close(round_id=rnd.pk)
    done = services.round_aggregate(round_id=rnd.pk)
    assert done is not None and done.status == "done"
    assert done.epsilon is not None and done.epsilon > 0


def test_dp_noise_is_secret_per_round_and_the_same_after_a_crash(db: Any, settings: Any) -> None:
    """Two jobs with every field equal (seed included) draw different noise; a crash does not."""
    from training import services
    from training.models import FederatedRound

    settings.ROUND_CHECKPOINT_EVERY = 2

    def run(name: str, *, crash: bool) -> tuple[dict[str, np.ndarray], bytes]:
        fleet = make_fleet(n_devices=4, name=name)
        job = _start(fleet, clip_norm=1.0, noise_multiplier=1.0, min_clients=4, quorum=4, rounds=1, seed=3)
        rnd = services.round_open(job_id=job.pk)
        for i in range(4):
            assert _train_and_upload(fleet, rnd, i).status_code == 201
        services.round_close(round_id=rnd.pk)
        if crash:
            seen: list[int] = []

            def boom(update_id: int) -> None:
                seen.append(update_id)
                if len(seen) == 3:
                    raise Crash

            with pytest.raises(Crash):
                services.round_aggregate(round_id=rnd.pk, on_update=boom)
            FederatedRound.objects.filter(pk=rnd.pk).update(
                lease_expires_at=timezone.now() - timedelta(seconds=1)
            )
            key_before = bytes(FederatedRound.objects.get(pk=rnd.pk).noise_key or b"")
        done = services.round_aggregate(round_id=rnd.pk)
        assert done is not None and done.status == "done"
        key = bytes(FederatedRound.objects.get(pk=rnd.pk).noise_key or b"")
        if crash:
            assert key == key_before  # the resumed worker draws the same noise
        return _round_weights(done.version), key

    first, key_a = run("dp-a", crash=False)
    second, key_b = run("dp-b", crash=True)
    assert len(key_a) == 32 and key_a != key_b
    # Same data, same fields, same seed: only the secret noise differs.
    assert any(not np.array_equal(first[n], second[n]) for n in first)
