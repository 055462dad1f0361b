"""Rounds with boards that train with ONNX Runtime: who is selected and why not (the
funnel), what the task carries, the failures boards report, and each update's backend.

The archives here are well-formed but hold no real graphs: the server never runs them,
it only checks, signs and serves them (training with real ones is in
``tests/devices_agent/test_ort_training.py`` and ``test_ort_live.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from django.test import Client

from devices_agent.codecs import encode_delta
from devices_agent.ort_artifacts import Manifest
from tests.training.federated.conftest import Fleet, make_fleet, make_job

MANIFEST: Manifest = {
    "format": "flotilla-ort-training/1",
    "loss": "cross_entropy",
    "trainable": ["fc1.weight"],
    "input": "input",
    "labels": "labels",
    "outputs": ["loss", "output"],
    "optimizers": {"sgd": "optimizer_sgd.onnx", "adam": "optimizer_adam.onnx"},
    "opset": 17,
    "builder": {"onnxruntime-training-cpu": "1.19.2"},
}


def _ready(version: Any, tmp_path: Path) -> Any:
    """Attach an ort_training archive to ``version`` and record it ready, as the build job does."""
    from devices_agent.ort_artifacts import MEMBERS, pack
    from models_registry.models import ModelVersion
    from models_registry.services import artifact_add

    folder = tmp_path / f"ort-{version.pk}"
    folder.mkdir()
    for name in MEMBERS:
        (folder / name).write_bytes(name.encode())
    artifact = artifact_add(version=version, kind="ort_training", data=pack(folder, MANIFEST))
    record = {"status": "ready", "from_version": version.pk, "sha256": artifact.sha256}
    ModelVersion.objects.filter(pk=version.pk).update(ort_training=record)
    version.refresh_from_db()
    return artifact


def _ort_only(fleet: Fleet, index: int) -> None:
    from fleet.models import Device

    device = fleet.devices[index]
    Device.objects.filter(pk=device.pk).update(state={**(device.state or {}), "training_backends": ["ort"]})


def _open(fleet: Fleet, **fields: Any) -> Any:
    from training import services

    job = make_job(fleet, **fields)
    services.job_start(job_id=job.pk, actor=None)
    return services.round_open(job_id=job.pk)


def _client(fleet: Fleet, index: int) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Device {fleet.secrets[index]}")


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({}, "ort_no_artifacts"),
        ({"status": "pending", "job": 1}, "ort_no_artifacts"),
        ({"status": "failed", "reason": "pip could not install"}, "ort_no_artifacts"),
        ({"status": "not_trainable", "op": "HardSwish", "node": "/HardSwish"}, "ort_not_trainable"),
    ],
)
def test_ort_only_boards_wait_for_a_version_they_can_train(
    db: Any, record: dict[str, Any], reason: str
) -> None:
    from models_registry.models import ModelVersion

    fleet = make_fleet(n_devices=3)
    ModelVersion.objects.filter(pk=fleet.version.pk).update(
        ort_training={**record, "from_version": fleet.version.pk} if record else {}
    )
    _ort_only(fleet, 0)
    rnd = _open(fleet, min_clients=2)
    assert rnd.status == "collecting"
    assert rnd.funnel[reason] == 1 and rnd.funnel["eligible"] == 2
    assert str(fleet.devices[0].pk) not in rnd.selected
    assert f"1 {reason}" not in rnd.failure_reason  # the round did not wait: two torch boards sufficed


def test_a_ready_version_takes_ort_boards_and_its_task_carries_the_signed_archive(
    db: Any, tmp_path: Path
) -> None:
    from devices_agent.ort_artifacts import read_manifest

    fleet = make_fleet(n_devices=3)
    artifact = _ready(fleet.version, tmp_path)
    _ort_only(fleet, 0)
    rnd = _open(fleet, min_clients=3)
    assert rnd.status == "collecting" and len(rnd.selected) == 3 and rnd.funnel["eligible"] == 3
    client = _client(fleet, 0)
    task = client.get(f"/api/agent/v1/rounds/{rnd.pk}/task").json()
    ref = task["ort_training"]
    assert ref["kind"] == "ort_training" and ref["sha256"] == artifact.sha256 and ref["signature"]
    assert task["failure_url"] == f"/api/agent/v1/rounds/{rnd.pk}/failure"
    # A selected board may download it (the round entitles it), and it is what was signed.
    body = b"".join(client.get(ref["url"]).streaming_content)  # type: ignore[attr-defined]
    assert read_manifest(body)["trainable"] == ["fc1.weight"]
    from models_registry.signing import signing_public_key_b64, verify_digest

    assert verify_digest(artifact.sha256, ref["signature"], signing_public_key_b64())
    # What boards check: a statement naming the round's base version and the archive.
    from models_registry.signing import verify_statement

    statement = ref["statement"]
    assert verify_statement(statement, ref["statement_signature"], signing_public_key_b64())
    assert statement["kind"] == "ort_training" and statement["sha256"] == artifact.sha256
    assert statement["version_id"] == task["base_version_id"] == rnd.base_version_id


def test_a_federated_version_trains_from_its_ancestors_archive(db: Any, tmp_path: Path) -> None:
    """The round's base changes every round; the graph does not, nor does the archive."""
    from models_registry.models import ModelVersion
    from models_registry.ort_training import ort_training_inherit, ort_training_ref
    from models_registry.selectors import version_program
    from models_registry.services import version_create
    from tests.bundles import digits_bundle
    from training import selectors

    fleet = make_fleet(n_devices=2)
    artifact = _ready(fleet.version, tmp_path)
    child = version_create(
        family=fleet.family,
        weights=digits_bundle("mlp", seed=1).weights,
        onnx=digits_bundle("mlp", seed=1).onnx,
        program=version_program(version=fleet.version),
        parent=fleet.version,
        source=ModelVersion.Source.FEDERATED,
        derived=True,
    )
    ort_training_inherit(version=child, parent=fleet.version)
    child.refresh_from_db()
    assert child.ort_training["from_version"] == fleet.version.pk
    ref = ort_training_ref(child)
    assert ref is not None and ref["sha256"] == artifact.sha256
    job = make_job(fleet, backends=["ort"])
    assert selectors.ort_unusable(job=job, version=child) is None


def test_fedprox_is_refused_for_ort_only_jobs_and_leaves_ort_boards_out(db: Any, tmp_path: Path) -> None:
    from core.api import ServiceError

    fleet = make_fleet(n_devices=3)
    _ready(fleet.version, tmp_path)
    with pytest.raises(ServiceError) as refused:
        make_job(fleet, backends=["ort"], strategy="fedprox", prox_mu=0.01)
    assert "FedProx" in refused.value.message and refused.value.details["backends"]
    _ort_only(fleet, 0)
    rnd = _open(fleet, strategy="fedprox", prox_mu=0.01, min_clients=2)
    assert rnd.funnel["ort_no_fedprox"] == 1 and str(fleet.devices[0].pk) not in rnd.selected


def test_a_board_that_cannot_train_reports_why_and_the_round_goes_on(db: Any, tmp_path: Path) -> None:
    from training.models import ClientUpdate, FederatedRound

    fleet = make_fleet(n_devices=3)
    _ready(fleet.version, tmp_path)
    _ort_only(fleet, 0)
    rnd = _open(fleet, min_clients=3, quorum=2)
    ort_board = _client(fleet, 0)
    failure = {"code": "artifact_unverified", "message": "the signature does not verify", "backend": "ort"}
    url = f"/api/agent/v1/rounds/{rnd.pk}/failure"
    first = ort_board.post(url, data=json.dumps(failure), content_type="application/json")
    assert first.status_code == 201, first.content
    again = ort_board.post(url, data=json.dumps(failure), content_type="application/json")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    other = ort_board.post(
        url, data=json.dumps({**failure, "code": "training_failed"}), content_type="application/json"
    )
    assert other.status_code == 409 and other.json()["error"]["code"] == "duplicate_update"
    bad = _client(fleet, 1).post(
        url, data=json.dumps({"code": "Not A Slug!", "message": "x"}), content_type="application/json"
    )
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_failure"
    update = ClientUpdate.objects.get(round=rnd, device=fleet.devices[0])
    assert (update.status, update.reason_code, update.backend) == ("rejected", "artifact_unverified", "ort")
    assert update.reason_message == "the signature does not verify"
    rnd.refresh_from_db()
    assert rnd.rejected == 1 and rnd.status == FederatedRound.Status.COLLECTING
    # The board no longer has the task; the others' updates close the round without the deadline.
    assert ort_board.get("/api/agent/v1/rounds/").json()["tasks"] == []
    from training import selectors

    weights = selectors.round_weights(rnd=rnd)
    for index in (1, 2):
        delta = {k: (v * 0 + 0.001).astype(v.dtype) for k, v in weights.items()}
        sent = _client(fleet, index).post(
            f"/api/agent/v1/rounds/{rnd.pk}/update",
            data=encode_delta(delta, codec="none").data,
            content_type="application/octet-stream",
            HTTP_X_NUM_EXAMPLES="20",
            HTTP_X_BACKEND="torch",
            HTTP_X_METRICS=json.dumps({"backend_torch": 1.0}),
        )
        assert sent.status_code == 201, sent.content
    assert selectors.round_answered(rnd=rnd) == 3
    assert set(
        ClientUpdate.objects.filter(round=rnd, status="accepted").values_list("backend", flat=True)
    ) == {"torch"}


def test_the_rounds_api_shows_each_updates_backend(db: Any, operator_client: Any) -> None:
    from training import selectors, services

    fleet = make_fleet(n_devices=2)
    rnd = _open(fleet, min_clients=2)
    weights = selectors.round_weights(rnd=rnd)
    for index, (header, metrics) in enumerate([("ort", None), (None, {"backend_torch": 1.0})]):
        services.update_receive(
            round_id=rnd.pk,
            device=fleet.devices[index],
            body=encode_delta({k: v * 0 for k, v in weights.items()}, codec="none").data,
            num_examples="10",
            metrics=json.dumps(metrics) if metrics else None,
            backend=header,
        )
    rounds = operator_client.get(f"/api/v1/federated-jobs/{rnd.job_id}/rounds/").json()
    listed = rounds["results"] if isinstance(rounds, dict) else rounds
    assert listed[0]["backends"] == {"ort": 1, "torch": 1}
    updates = operator_client.get(f"/api/v1/federated-jobs/{rnd.job_id}/rounds/1/updates/").json()
    rows = updates["results"] if isinstance(updates, dict) else updates
    assert sorted((row["device_name"], row["backend"], row["status"]) for row in rows) == [
        ("digits-dev-0", "ort", "accepted"),
        ("digits-dev-1", "torch", "accepted"),
    ]


def test_registration_and_jobs_that_accept_ort_ask_for_the_artifacts(
    db: Any, settings: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from models_registry.models import ModelJob
    from tests.bundles import digits_version

    fleet = make_fleet(n_devices=2)  # registered before builds were asked for
    settings.ORT_TRAINING_AUTO = True
    assert fleet.version.ort_training == {}
    make_job(fleet, backends=["torch"])
    assert not ModelJob.objects.filter(kind="ort_training").exists()
    make_job(fleet)  # any backend: ort boards may join
    job = ModelJob.objects.get(kind="ort_training", version=fleet.version)
    fleet.version.refresh_from_db()
    assert fleet.version.ort_training == {
        "status": "pending",
        "job": job.pk,
        "from_version": fleet.version.pk,
    }
    make_job(fleet, backends=["ort", "torch"])
    assert ModelJob.objects.filter(kind="ort_training").count() == 1  # one build per version
    with django_capture_on_commit_callbacks(execute=True):  # the build is asked for after commit
        uploaded = digits_version(fleet.family, seed=3)
    assert ModelJob.objects.filter(kind="ort_training", version=uploaded).count() == 1
    uploaded.refresh_from_db()
    assert uploaded.ort_training["status"] == "pending"
