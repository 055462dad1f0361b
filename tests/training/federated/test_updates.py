"""Device API of a round: task, weights, and every way an update can be refused."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from django.test import Client, override_settings
from safetensors.numpy import save as st_save

from devices_agent.codecs import CODEC_VERSION, encode_delta
from tests.training.federated.conftest import Fleet, make_fleet, make_job


def _open_round(fleet: Fleet, **fields: Any) -> Any:
    from training import services

    job = make_job(fleet, **fields)
    services.job_start(job_id=job.pk, actor=None)
    rnd = services.round_open(job_id=job.pk)
    assert rnd is not None and rnd.status == "collecting"
    return rnd


def _client(secret: str) -> Client:
    return Client(HTTP_AUTHORIZATION=f"Device {secret}")


def _shapes() -> dict[str, tuple[int, ...]]:
    from tests.bundles import digits_weights

    return {k: v.shape for k, v in digits_weights("mlp").items() if v.dtype == np.float32}


def _delta(scale: float = 0.01, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in _shapes().items()}


def _post(client: Client, round_id: int, body: bytes, *, examples: str = "40", metrics: str = "") -> Any:
    headers: dict[str, Any] = {"HTTP_X_NUM_EXAMPLES": examples}
    if metrics:
        headers["HTTP_X_METRICS"] = metrics
    return client.post(
        f"/api/agent/v1/rounds/{round_id}/update",
        data=body,
        content_type="application/octet-stream",
        **headers,
    )


def test_selected_device_gets_task_and_weights_with_etag(fleet: Fleet) -> None:
    rnd = _open_round(fleet)
    client = _client(fleet.secrets[0])
    task = client.get(f"/api/agent/v1/rounds/{rnd.pk}/task").json()
    assert task["round_id"] == rnd.pk and task["spec"]["input_shape"] == [64] and task["codec"] == "none"
    weights = client.get(task["weights_url"])
    assert weights.status_code == 200
    etag = weights["ETag"]
    assert etag == f'"{task["weights_sha256"]}"'
    again = client.get(task["weights_url"], HTTP_IF_NONE_MATCH=etag)
    assert again.status_code == 304
    listed = client.get("/api/agent/v1/rounds/").json()["tasks"]
    assert [t["round_id"] for t in listed] == [rnd.pk]
    assert listed[0]["config"] == task  # the long poll carries the task body
    assert client.get("/api/agent/v1/rounds/?wait=1").json()["tasks"][0]["round_id"] == rnd.pk


def test_accepted_then_identical_retry_is_idempotent_and_different_bytes_conflict(fleet: Fleet) -> None:
    from training.models import ClientUpdate, FederatedRound

    rnd = _open_round(fleet)
    client = _client(fleet.secrets[0])
    body = encode_delta(_delta(), codec="int8").data
    first = _post(client, rnd.pk, body, metrics=json.dumps({"train_loss": 0.5}))
    assert first.status_code == 201, first.content
    retry = _post(client, rnd.pk, body)
    assert retry.status_code == 200 and retry.json()["duplicate"] is True
    other = _post(client, rnd.pk, encode_delta(_delta(seed=2), codec="int8").data)
    assert other.status_code == 409 and other.json()["error"]["code"] == "duplicate_update"
    update = ClientUpdate.objects.get(round=rnd)
    assert update.status == "accepted" and update.num_examples == 40
    assert update.metrics == {"train_loss": 0.5}
    rnd = FederatedRound.objects.get(pk=rnd.pk)
    assert rnd.participants == 1 and rnd.bytes_in == len(body)
    # The device has answered: its task is no longer listed.
    assert client.get("/api/agent/v1/rounds/").json()["tasks"] == []


def _bad_bodies() -> dict[str, tuple[bytes, int, str]]:
    good = _delta()
    nan = dict(good)
    nan["fc1.weight"] = nan["fc1.weight"].copy()
    nan["fc1.weight"][0, 0] = np.nan
    inf = dict(good)
    inf["fc2.bias"] = inf["fc2.bias"].copy()
    inf["fc2.bias"][3] = np.inf
    wrong_shape = dict(good)
    wrong_shape["fc3.weight"] = np.zeros((10, 63), np.float32)
    meta = {"codec": "none", "codec_version": str(CODEC_VERSION)}
    wrong_dtype = st_save(
        {k: v.astype(np.float16) if k == "fc1.bias" else v for k, v in good.items()}, metadata=meta
    )
    full = encode_delta(good, codec="none").data
    return {
        "nan": (st_save(nan, metadata=meta), 400, "non_finite"),
        "inf": (st_save(inf, metadata=meta), 400, "non_finite"),
        "wrong_shape": (st_save(wrong_shape, metadata=meta), 400, "shape_mismatch"),
        "wrong_dtype": (wrong_dtype, 400, "dtype_mismatch"),
        "huge_norm": (encode_delta(_delta(scale=10.0), codec="none").data, 422, "norm_too_large"),
        "truncated": (full[: len(full) - 100], 400, "truncated"),
        "garbage": (b"\x00" * 3, 400, "truncated"),
        "not_json_header": (
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\x00" * 8,
            400,
            "malformed",
        ),
    }


@pytest.mark.parametrize("case", sorted(_bad_bodies()))
def test_bad_delta_is_refused_recorded_and_round_goes_on(fleet: Fleet, case: str) -> None:
    from training.models import ClientUpdate, FederatedRound

    body, status_code, code = _bad_bodies()[case]
    rnd = _open_round(fleet, clip_norm=5.0)
    response = _post(_client(fleet.secrets[0]), rnd.pk, body)
    assert response.status_code == status_code, response.content
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    rejected = ClientUpdate.objects.get(round=rnd, device=fleet.devices[0])
    assert rejected.status == "rejected" and rejected.reason_code == code and rejected.reason_message
    assert rejected.path == ""
    # The round goes on: still collecting, and another device's good delta is accepted.
    ok = _post(_client(fleet.secrets[1]), rnd.pk, encode_delta(_delta(), codec="fp16").data)
    assert ok.status_code == 201, ok.content
    rnd = FederatedRound.objects.get(pk=rnd.pk)
    assert rnd.status == "collecting" and rnd.rejected == 1 and rnd.participants == 1


@override_settings(ROUND_UPDATE_MAX_BYTES=1000)
def test_oversize_body_is_413_and_recorded(fleet: Fleet) -> None:
    from training.models import ClientUpdate

    rnd = _open_round(fleet)
    response = _post(_client(fleet.secrets[0]), rnd.pk, encode_delta(_delta(), codec="none").data)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert ClientUpdate.objects.get(round=rnd).reason_code == "too_large"


def test_bad_num_examples_and_metrics_are_refused(fleet: Fleet) -> None:
    rnd = _open_round(fleet)
    body = encode_delta(_delta(), codec="none").data
    response = _post(_client(fleet.secrets[0]), rnd.pk, body, examples="-3")
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_num_examples"
    response = _post(_client(fleet.secrets[1]), rnd.pk, body, metrics='{"loss": "NaN"}')
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_metrics"


def test_wrong_round_unselected_device_and_closed_round(db: Any) -> None:
    from training import services
    from training.models import FederatedRound

    fleet = make_fleet(n_devices=4)
    rnd = _open_round(fleet, clients_fraction=0.5, min_clients=2)
    selected = set(rnd.selected)
    outsider = next(i for i, d in enumerate(fleet.devices) if str(d.pk) not in selected)
    insider = next(i for i, d in enumerate(fleet.devices) if str(d.pk) in selected)
    body = encode_delta(_delta(), codec="none").data
    missing = _post(_client(fleet.secrets[insider]), rnd.pk + 1000, body)
    assert missing.status_code == 404
    response = _post(_client(fleet.secrets[outsider]), rnd.pk, body)
    assert response.status_code == 403 and response.json()["error"]["code"] == "not_selected"
    task = _client(fleet.secrets[outsider]).get(f"/api/agent/v1/rounds/{rnd.pk}/task")
    assert task.status_code == 403
    FederatedRound.objects.filter(pk=rnd.pk).update(status="aggregating")
    late = _post(_client(fleet.secrets[insider]), rnd.pk, body)
    assert late.status_code == 409 and late.json()["error"]["code"] == "round_closed"
    assert services.round_close(round_id=rnd.pk) is not None


def test_operator_token_cannot_use_device_api(fleet: Fleet, operator_client: Any) -> None:
    rnd = _open_round(fleet)
    response = operator_client.get(f"/api/agent/v1/rounds/{rnd.pk}/task")
    assert response.status_code in (401, 403)


def test_heartbeat_carries_the_training_task(fleet: Fleet) -> None:
    from fleet.services.heartbeat import heartbeat_caches_clear

    rnd = _open_round(fleet)
    heartbeat_caches_clear()
    response = _client(fleet.secrets[0]).post(
        "/api/agent/v1/heartbeat", data={"seq": 1}, content_type="application/json"
    )
    assert response.status_code == 200, response.content
    tasks = response.json()["tasks"]
    assert [(t["kind"], t["round_id"], t["task_url"]) for t in tasks] == [
        ("train", rnd.pk, f"/api/agent/v1/rounds/{rnd.pk}/task")
    ]


def test_a_claimed_weight_is_capped_by_what_the_board_reported(fleet: Fleet) -> None:
    """``X-Num-Examples: 2000000000`` counts as the examples the board reported when chosen."""
    from training.models import ClientUpdate

    rnd = _open_round(fleet, max_examples_per_update=45)
    reported = rnd.selected_examples[str(fleet.devices[0].pk)]
    assert reported == [50, 10]  # the fleet's boards report 50 training and 10 holdout examples
    poisoned = _post(
        _client(fleet.secrets[0]),
        rnd.pk,
        encode_delta(_delta(), codec="none").data,
        examples="2000000000",
        metrics=json.dumps({"holdout_examples": 1e9, "holdout_accuracy": 0.9}),
    )
    assert poisoned.status_code == 201, poisoned.content
    update = ClientUpdate.objects.get(round=rnd, device=fleet.devices[0])
    assert update.num_examples == 45  # the job's cap is below the board's 50
    assert update.metrics["claimed_examples"] == 2e9
    assert update.metrics["holdout_examples"] == 10 and update.metrics["claimed_holdout_examples"] == 1e9
    honest = _post(
        _client(fleet.secrets[1]), rnd.pk, encode_delta(_delta(seed=3), codec="none").data, examples="7"
    )
    assert honest.status_code == 201
    assert ClientUpdate.objects.get(round=rnd, device=fleet.devices[1]).num_examples == 7


def test_without_a_job_bound_an_update_may_not_dwarf_the_model(fleet: Fleet) -> None:
    from tests.bundles import digits_weights

    rnd = _open_round(fleet)  # no clip_norm, no max_update_norm
    model_norm = float(
        np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in digits_weights("mlp").values()))
    )
    delta = _delta(scale=1.0)
    norm = float(np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in delta.values())))
    huge = {k: v * (20 * model_norm / norm) for k, v in delta.items()}
    response = _post(_client(fleet.secrets[0]), rnd.pk, encode_delta(huge, codec="none").data)
    assert response.status_code == 422 and response.json()["error"]["code"] == "norm_too_large"
    fine = _post(_client(fleet.secrets[1]), rnd.pk, encode_delta(_delta(), codec="none").data)
    assert fine.status_code == 201


def test_job_refuses_a_nonsense_example_cap(fleet: Fleet) -> None:
    from core.api import ServiceError

    with pytest.raises(ServiceError) as refused:
        make_job(fleet, max_examples_per_update=0)
    assert "max_examples_per_update" in refused.value.details


def _evaluation_round(fleet: Fleet) -> Any:
    """An evaluation round that selected the fleet's first two boards (as round_open leaves it)."""
    from django.utils import timezone

    from training import services
    from training.models import FederatedRound

    job = make_job(fleet)
    services.job_start(job_id=job.pk, actor=None)
    chosen = [str(fleet.devices[0].pk), str(fleet.devices[1].pk)]
    return FederatedRound.objects.create(
        job=job,
        number=1,
        kind=FederatedRound.Kind.EVALUATE,
        status=FederatedRound.Status.COLLECTING,
        base_version=fleet.version,
        selected=chosen,
        selected_examples={c: [50, 10] for c in chosen},
        opened_at=timezone.now(),
        deadline=timezone.now() + timedelta(minutes=5),
    )


def _evaluate(client: Client, round_id: int, metrics: Any) -> Any:
    return client.post(
        f"/api/agent/v1/rounds/{round_id}/evaluation",
        data=json.dumps({"metrics": metrics}),
        content_type="application/json",
    )


def test_an_evaluation_is_stored_once_and_its_weight_is_what_the_board_holds(fleet: Fleet) -> None:
    from training.models import ClientUpdate

    rnd = _evaluation_round(fleet)
    good = {"holdout_accuracy": 0.8, "holdout_loss": 0.5, "holdout_examples": 8}
    first = _evaluate(_client(fleet.secrets[0]), rnd.pk, good)
    assert first.status_code == 201, first.content
    assert _evaluate(_client(fleet.secrets[0]), rnd.pk, good).json()["duplicate"] is True
    changed = _evaluate(_client(fleet.secrets[0]), rnd.pk, {**good, "holdout_accuracy": 0.9})
    assert changed.status_code == 409 and changed.json()["error"]["code"] == "duplicate_update"
    # A claim beyond the holdout the board reported weighs only what it reported.
    inflated = _evaluate(_client(fleet.secrets[1]), rnd.pk, {**good, "holdout_examples": 10**9})
    assert inflated.status_code == 201
    row = ClientUpdate.objects.get(round=rnd, device=fleet.devices[1])
    assert row.num_examples == 10 and row.metrics["claimed_holdout_examples"] == 10**9


@pytest.mark.parametrize(
    ("metrics", "status_code", "code"),
    [
        ({"holdout_accuracy": 1.5, "holdout_loss": 0.5, "holdout_examples": 8}, 400, "bad_metrics"),
        ({"holdout_accuracy": 0.5, "holdout_loss": -1, "holdout_examples": 8}, 400, "bad_metrics"),
        ({"holdout_accuracy": 0.5, "holdout_loss": 0.5, "holdout_examples": 2.5}, 400, "bad_metrics"),
        ({"holdout_accuracy": 0.5, "holdout_loss": 0.5, "holdout_examples": 0}, 400, "bad_metrics"),
        ({"holdout_accuracy": 0.5, "holdout_examples": 8}, 400, "bad_metrics"),
        ({"holdout_accuracy": "NaN", "holdout_loss": 0.5, "holdout_examples": 8}, 400, "bad_metrics"),
        ("not an object", 400, "bad_metrics"),
    ],
)
def test_bad_evaluations_are_refused_and_store_nothing(
    fleet: Fleet, metrics: Any, status_code: int, code: str
) -> None:
    from training.models import ClientUpdate

    rnd = _evaluation_round(fleet)
    response = _evaluate(_client(fleet.secrets[0]), rnd.pk, metrics)
    assert response.status_code == status_code and response.json()["error"]["code"] == code
    assert not ClientUpdate.objects.filter(round=rnd).exists()


def test_evaluations_only_from_chosen_boards_and_only_for_evaluation_rounds(fleet: Fleet) -> None:
    good = {"holdout_accuracy": 0.8, "holdout_loss": 0.5, "holdout_examples": 8}
    rnd = _evaluation_round(fleet)
    outsider = _evaluate(_client(fleet.secrets[2]), rnd.pk, good)
    assert outsider.status_code == 403 and outsider.json()["error"]["code"] == "not_selected"
    training = _open_round(fleet)
    wrong = _evaluate(_client(fleet.secrets[0]), training.pk, good)
    assert wrong.status_code == 409 and wrong.json()["error"]["code"] == "not_an_evaluation"


def test_weights_download_checks_the_selection_when_the_round_is_cached(fleet: Fleet) -> None:
    from fleet.auth import hash_secret, new_secret
    from fleet.models import Device

    rnd = _open_round(fleet)
    assert _client(fleet.secrets[0]).get(f"/api/agent/v1/rounds/{rnd.pk}/weights").status_code == 200
    secret = new_secret()
    Device.objects.create(name="outsider", secret_hash=hash_secret(secret), status=Device.Status.ONLINE)
    refused = _client(secret).get(f"/api/agent/v1/rounds/{rnd.pk}/weights")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_selected"
