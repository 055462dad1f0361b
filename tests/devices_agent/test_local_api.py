"""The agent's local API: the service, the HTTP-over-Unix-socket transport and the stdlib client."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devices_agent.family import FamilySpec
from devices_agent.inference import load_session
from devices_agent.local_api import ActiveModel, LocalApiServer, LocalService
from devices_agent.local_client import AgentClient, LocalApiError
from devices_agent.samples import SampleStore
from tests.devices_agent.agent_helpers import linear_onnx

SPEC = FamilySpec(task="classification", input_shape=(64,), num_classes=10)


class Recorded:
    def __init__(self) -> None:
        self.samples: list[tuple[str, float, int | None]] = []

    def __call__(self, name: str, value: float, version_id: int | None) -> None:
        self.samples.append((name, value, version_id))

    def names(self) -> list[str]:
        return [n for n, _, _ in self.samples]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[LocalService, AgentClient, Recorded]]:
    active = ActiveModel(version_id=7, spec=SPEC, session=load_session(linear_onnx(seed=0)))
    record = Recorded()
    store = SampleStore(tmp_path / "samples.sqlite3", max_examples=50)
    service = LocalService(model=lambda: active, store=store, record=record, max_batch=32)
    server = LocalApiServer(service, socket_path=tmp_path / "agent.sock", mode=0o600, max_body=64 * 1024)
    server.start()
    client = AgentClient(str(tmp_path / "agent.sock"))
    try:
        yield service, client, record
    finally:
        client.close()
        server.stop()
        store.close()


def test_predict_one_example_and_a_batch_with_feedback(served: Any) -> None:
    service, client, record = served
    x = np.random.default_rng(1).random((5, 64), dtype=np.float32)
    expected = load_session(linear_onnx(seed=0)).run(None, {"input": x})[0].argmax(axis=1)
    one = client.predict(x[0])
    assert one["label"] == int(expected[0]) and 0.0 < one["score"] <= 1.0
    assert one["version_id"] == 7 and one["model"] == "global" and len(one["outputs"]) == 10
    batch = client.predict(x, batch=True)
    assert [p["label"] for p in batch] == [int(v) for v in expected]
    # Nested lists work too (JSON when the input is not one regular array).
    assert client.predict(x[0].tolist())["label"] == int(expected[0])
    assert record.names().count("latency_ms") == 3 and record.names().count("confidence") == 7
    answer = client.feedback(one["prediction_id"], int(expected[0]))
    assert answer["recorded"] == "correct" and answer["value"] == 1.0 and answer["examples"] == 1
    assert ("correct", 1.0, 7) in record.samples
    with pytest.raises(LocalApiError) as twice:
        client.feedback(one["prediction_id"], 0)  # answered already
    assert twice.value.status == 404 and twice.value.code == "unknown_prediction"
    assert client.status()["examples"] == 1


def test_add_samples_keeps_examples_with_a_fixed_holdout(served: Any) -> None:
    service, client, _ = served
    rng = np.random.default_rng(0)
    # 45 examples, up to the store's bound of 50 with the 5 added below: the split is random
    # per store, and 45 leave no holdout only once in 20,000 stores.
    client.add_samples(rng.random((25, 64), dtype=np.float32), rng.integers(0, 10, 25))
    answer = client.add_samples(rng.random((20, 64), dtype=np.float32), rng.integers(0, 10, 20))
    assert answer["added"] == 20 and answer["examples"] == 45
    assert 0 < answer["holdout_examples"] < 45
    assert answer["training_examples"] + answer["holdout_examples"] == 45
    split = (answer["training_examples"], answer["holdout_examples"])
    client.add_samples(rng.random((5, 64), dtype=np.float32), rng.integers(0, 10, 5))
    after = client.status()
    # Earlier examples keep their side of the split as more arrive.
    assert after["training_examples"] >= split[0] and after["holdout_examples"] >= split[1]


@pytest.mark.parametrize(
    ("body", "code", "status"),
    [
        (b"{not json", "malformed_json", 400),
        (b"[1, 2]", "malformed_json", 400),
        (json.dumps({"nope": 1}).encode(), "malformed", 400),
        (json.dumps({"inputs": [0.0] * 63}).encode(), "wrong_shape", 400),
        (json.dumps({"inputs": [[0.0] * 64, [0.0] * 3]}).encode(), "invalid_input", 400),
        (json.dumps({"inputs": ["a"] * 64}).encode(), "invalid_input", 400),
        (json.dumps({"inputs": [[0.0] * 64] * 2}).encode(), "wrong_shape", 400),  # a batch without batch=true
        (json.dumps({"inputs": [[0.0] * 64] * 33, "batch": True}).encode(), "batch_too_large", 413),
    ],
)
def test_malformed_requests_get_a_clear_error(served: Any, body: bytes, code: str, status: int) -> None:
    service, client, record = served
    answer_status, answer = _raw(client.address, "/v1/predict", body)
    assert (answer_status, answer["error"]["code"]) == (status, code), answer
    assert "latency_ms" not in record.names()  # nothing ran


def test_non_finite_and_raw_shape_mismatches_are_refused(served: Any) -> None:
    _, client, _ = served
    x = np.zeros(64, dtype=np.float32)
    x[3] = np.nan
    with pytest.raises(LocalApiError) as caught:
        client.predict(x)
    assert caught.value.code == "non_finite"
    status, answer = _raw(
        client.address,
        "/v1/predict",
        b"\x00" * 12,
        headers={"Content-Type": "application/octet-stream", "X-Shape": "64", "X-Dtype": "float32"},
    )
    assert status == 400 and answer["error"]["code"] == "wrong_shape"


def test_an_oversized_body_is_refused_without_being_read(served: Any) -> None:
    _, client, _ = served
    status, answer = _raw(client.address, "/v1/samples", b"x" * (128 * 1024))
    assert status == 413 and answer["error"]["code"] == "too_large"


def test_unknown_prediction_ids_and_bad_labels(served: Any) -> None:
    _, client, _ = served
    with pytest.raises(LocalApiError) as unknown:
        client.feedback(123456789, 1)
    assert unknown.value.status == 404
    p = client.predict(np.zeros(64, dtype=np.float32))
    with pytest.raises(LocalApiError) as out_of_range:
        client.feedback(p["prediction_id"], 10)
    assert out_of_range.value.code == "label_out_of_range"
    status, answer = _raw(
        client.address, "/v1/feedback", json.dumps({"prediction_id": "7", "label": 1}).encode()
    )
    assert status == 400 and answer["error"]["code"] == "invalid_prediction_id"


def test_a_full_store_evicts_the_oldest_and_reports_them(served: Any) -> None:
    service, client, record = served
    rng = np.random.default_rng(0)
    for _ in range(3):
        client.add_samples(rng.random((20, 64), dtype=np.float32), rng.integers(0, 10, 20))
    assert client.status()["examples"] == 50  # the bound
    evicted = [v for n, v, _ in record.samples if n == "samples_evicted"]
    assert sum(evicted) == 10
    with pytest.raises(LocalApiError) as too_many:
        client.add_samples(rng.random((51, 64), dtype=np.float32), rng.integers(0, 10, 51))
    assert too_many.value.status == 413  # a batch larger than the store itself
    assert client.status()["examples"] == 50


def test_no_model_yet_is_a_clear_503(tmp_path: Path) -> None:
    store = SampleStore(tmp_path / "s.sqlite3")
    service = LocalService(model=lambda: None, store=store, record=Recorded())
    server = LocalApiServer(service, socket_path=tmp_path / "a.sock")
    server.start()
    try:
        with AgentClient(str(tmp_path / "a.sock")) as client, pytest.raises(LocalApiError) as caught:
            client.predict([0.0] * 64)
        assert caught.value.status == 503 and caught.value.code == "no_model"
    finally:
        server.stop()
        store.close()


def test_loopback_http_serves_the_same_api(tmp_path: Path) -> None:
    active = ActiveModel(version_id=1, spec=SPEC, session=load_session(linear_onnx()))
    store = SampleStore(tmp_path / "s.sqlite3")
    service = LocalService(model=lambda: active, store=store, record=Recorded())
    server = LocalApiServer(service, socket_path=None, http="127.0.0.1:0")
    server.start()
    try:
        assert server.http_address is not None
        host, port = server.http_address
        with AgentClient(f"http://{host}:{port}") as client:
            assert 0 <= client.predict([0.5] * 64)["label"] < 10
        with pytest.raises(ValueError, match="loopback"):
            LocalApiServer(service, socket_path=None, http="0.0.0.0:0")
    finally:
        server.stop()
        store.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_caller_without_permission_on_the_socket_is_refused(served: Any, tmp_path: Path) -> None:
    import pwd

    _, client, _ = served
    # The socket is 0600 root (its folder open to others): another user cannot connect.
    os.chmod(tmp_path, 0o711)  # noqa: S103 - traversable, not listable, for the other user
    other = pwd.getpwnam("nobody")
    child = os.fork()
    if child == 0:  # the other user's process: only system calls, then out
        code = 1
        try:
            os.setgid(other.pw_gid)
            os.setuid(other.pw_uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(client.address)
            code = 0
        except PermissionError:
            code = 13
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 13
    assert 0 <= client.predict([0.5] * 64)["label"] < 10  # the owner still can


def test_a_regression_family_answers_values_and_records_abs_error(tmp_path: Path) -> None:
    spec = FamilySpec(task="regression", input_shape=(64,), output_size=10)
    active = ActiveModel(version_id=3, spec=spec, session=load_session(linear_onnx()))
    record = Recorded()
    store = SampleStore(tmp_path / "s.sqlite3")
    service = LocalService(model=lambda: active, store=store, record=record)
    x = np.random.default_rng(0).random(64, dtype=np.float32)
    answer = service.predict(x)["predictions"][0]
    assert len(answer["values"]) == 10 and "label" not in answer
    target = [v + 1.0 for v in answer["values"]]
    service.feedback(answer["prediction_id"], target)
    name, value, version = record.samples[-1]
    assert (name, version) == ("abs_error", 3) and abs(value - 1.0) < 1e-5
    store.close()


def _raw(address: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """One request by hand, for bodies the client would never send."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    head = {"Content-Type": "application/json", **(headers or {})}
    lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
    sock.sendall(f"POST {path} HTTP/1.1\r\n{lines}Content-Length: {len(body)}\r\n\r\n".encode() + body)
    reader = sock.makefile("rb")
    status = int(reader.readline().split()[1])
    length = 0
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        if name.lower() == "content-length":
            length = int(value)
    data = reader.read(length)
    sock.close()
    return status, json.loads(data)
