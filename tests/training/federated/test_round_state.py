"""What a round records and announces: its state in fields of its own (shown as
``durations`` by the API), the registry's evaluation of its version, and the events a
round's opening sends to the long-poll wake-up."""

from __future__ import annotations

from typing import Any

import pytest

from tests.training.federated.conftest import Fleet, make_fleet, make_job, upload_deltas

pytestmark = pytest.mark.django_db


def _run_round(fleet: Fleet, **fields: Any) -> tuple[Any, Any]:
    from training import services

    job = make_job(fleet, **fields)
    services.job_start(job_id=job.pk, actor=None)
    rnd = services.round_open(job_id=job.pk)
    upload_deltas(fleet, rnd)
    services.round_close(round_id=rnd.pk)
    done = services.round_aggregate(round_id=rnd.pk)
    assert done is not None and done.status == "done", done
    return job, done


def test_round_version_is_evaluated_through_the_registry(db: Any) -> None:
    from models_registry.models import Artifact, EvaluationReport
    from training.models import FederatedJob

    fleet = make_fleet(n_devices=3)
    job, rnd = _run_round(fleet, rounds=1)
    [report] = EvaluationReport.objects.filter(version=rnd.version)
    assert report.dataset == "digits-test" and report.report["num_examples"] == 360
    assert rnd.accuracy == report.report["accuracy"] and rnd.loss == report.report["loss"]
    assert rnd.confusion == report.report["confusion_matrix"]
    rnd.version.refresh_from_db()
    assert rnd.version.metrics["accuracy"] == rnd.accuracy and rnd.version.metrics["dataset"] == "digits-test"
    job = FederatedJob.objects.get(pk=job.pk)
    assert job.best_version == rnd.version and job.best_accuracy == rnd.accuracy
    # The round's graph is the base's with the new weights: boards can serve and train it.
    kinds = set(Artifact.objects.filter(version=rnd.version).values_list("kind", flat=True))
    assert kinds == {"weights", "onnx", "program"}


def test_round_fields_and_the_api_durations(fleet: Fleet, operator_client: Any) -> None:
    job, rnd = _run_round(fleet, rounds=1)
    assert rnd.eligible == 3 and rnd.lease_expires_at is None and rnd.server_state_path == ""
    assert all(v is not None and v >= 0 for v in (rnd.collect_s, rnd.aggregate_s, rnd.evaluate_s))
    [row] = operator_client.get(f"/api/v1/federated-jobs/{job.pk}/rounds/").json()["results"]
    assert row["durations"] == {
        "collect_s": rnd.collect_s,
        "aggregate_s": rnd.aggregate_s,
        "evaluate_s": rnd.evaluate_s,
    }
    assert row["eligible"] == 3 and "server_state_path" not in row and "lease_expires_at" not in row


def test_server_optimiser_state_moves_from_round_to_job(db: Any) -> None:
    from training.models import FederatedJob

    fleet = make_fleet(n_devices=3)
    job, rnd = _run_round(fleet, rounds=1, strategy="fedadam", strategy_params={"eta": 0.01})
    assert rnd.server_state_path.endswith("server_state.safetensors")
    assert FederatedJob.objects.get(pk=job.pk).server_state_path == rnd.server_state_path


def test_round_open_announces_its_devices_and_wakes_long_polls(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    from core.events import Event, subscribed
    from training import notify, services

    woken: list[int] = []
    monkeypatch.setattr(notify, "rounds_changed", lambda *, round_id: woken.append(round_id))
    heard: list[Event] = []
    job = make_job(fleet)
    with subscribed(heard.append, names=["federated_*"]):
        with django_capture_on_commit_callbacks(execute=False):
            services.job_start(job_id=job.pk, actor=None)
        with django_capture_on_commit_callbacks(execute=True):
            rnd = services.round_open(job_id=job.pk)
    assert woken == [rnd.pk]
    by_name = {e.name: e.payload for e in heard}
    assert by_name["federated_round.status"] == {"job": job.pk, "round": 1, "status": "collecting"}
    opened = by_name["federated_round.opened"]
    assert opened["job"] == job.pk and opened["round"] == 1 and sorted(opened["devices"]) == rnd.selected


def test_noise_a_strategy_cannot_add_is_refused_at_validation(fleet: Fleet) -> None:
    from core.api import ServiceError

    with pytest.raises(ServiceError) as refused:
        make_job(fleet, strategy="median", clip_norm=1.0, noise_multiplier=0.5)
    assert refused.value.code == "validation_error"
    assert "noise_multiplier" in refused.value.details
    assert "cannot add differential-privacy noise" in refused.value.details["noise_multiplier"]
    assert make_job(fleet, strategy="median", clip_norm=1.0).pk  # clipping alone is fine
    with pytest.raises(ServiceError, match="set by the server"):
        make_job(fleet, strategy="fedadam", strategy_params={"state": None})


def test_a_round_that_cannot_be_evaluated_fails_with_the_reason(db: Any) -> None:
    from models_registry.models import ModelFamily
    from training import services
    from training.models import FederatedJob, FederatedRound

    fleet = make_fleet(n_devices=3)
    job = make_job(fleet, rounds=2)
    services.job_start(job_id=job.pk, actor=None)
    rnd = services.round_open(job_id=job.pk)
    upload_deltas(fleet, rnd)
    services.round_close(round_id=rnd.pk)
    # The family's contract no longer fits its own models: nothing can be registered.
    ModelFamily.objects.filter(pk=fleet.family.pk).update(input_shape=[32])
    assert services.round_aggregate(round_id=rnd.pk) is None
    rnd = FederatedRound.objects.get(pk=rnd.pk)
    assert rnd.status == "failed" and rnd.lease_expires_at is None
    assert rnd.failure_reason.startswith("evaluation failed:")
    assert "the family expects [batch, 32]" in rnd.failure_reason
    assert FederatedJob.objects.get(pk=job.pk).consecutive_failures == 1
