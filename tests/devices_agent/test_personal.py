"""The personaliser: fine-tunes a local head, rebases it across versions, keeps it local."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from devices_agent.local_train import apply_delta, train_local
from devices_agent.personal import Personaliser

from config.demo.nets import build_model, initial_weights, state_to_numpy
from devices_agent.agent import Agent
from devices_agent.codecs import encode_tensors
from devices_agent.config import AgentConfig
from devices_agent.data import client_dataset, load_digits_split
from devices_agent.outbox import Outbox
from tests.devices_agent.agent_helpers import ScriptedServer, Signer, linear_onnx
from tests.devices_agent.test_agent import FakeFleet

SIGNER = Signer()

Weights = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def global_weights() -> Weights:
    """A global model trained briefly on part of the (IID) digits."""
    x_train, y_train, _, _ = load_digits_split(seed=0)
    start = initial_weights("mlp", seed=0)
    result = train_local(
        arch="mlp",
        global_weights=start,
        x=x_train[:300],
        y=y_train[:300],
        epochs=3,
        batch_size=32,
        lr=0.01,
        optimizer="adam",
        seed=0,
    )
    return apply_delta(start, result.delta)


@pytest.fixture(scope="module")
def skewed_data() -> tuple[np.ndarray, np.ndarray]:
    """A non-IID client: Dirichlet(0.05) label skew, so a few labels dominate."""
    return client_dataset(client_index=0, n_clients=10, alpha=0.05, seed=0)


def test_fine_tuned_head_beats_the_global_model_on_local_data(
    tmp_path: Path, global_weights: Weights, skewed_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = skewed_data
    assert len(set(y.tolist())) < 10  # the partition really is skewed
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    personaliser = Personaliser(
        state_dir=tmp_path,
        x=x,
        y=y,
        arch="mlp",
        epochs=20,
        record=lambda name, value, vid: outbox.add(name, value, version_id=vid),
    )
    assert personaliser.needs(7)
    result = personaliser.personalise(version_id=7, global_weights=global_weights)
    assert result.personal_accuracy > result.global_accuracy
    assert result.personal_accuracy > 0.8
    assert result.rebase == "reset"  # nothing to carry over the first time
    assert not personaliser.needs(7) and personaliser.needs(8)
    meta = json.loads((tmp_path / "personal" / "meta.json").read_text())
    assert meta["base_version_id"] == 7 and meta["rebase"] == "reset"
    assert meta["personal_accuracy"] == pytest.approx(result.personal_accuracy)
    head = personaliser.load_head()
    assert head is not None and set(head) == {"fc3.weight", "fc3.bias"}
    assert not np.array_equal(head["fc3.weight"], global_weights["fc3.weight"])
    outbox.close()


def test_only_two_numbers_leave_the_board(
    tmp_path: Path, global_weights: Weights, skewed_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = skewed_data
    outbox = Outbox(tmp_path / "outbox.sqlite3")
    personaliser = Personaliser(
        state_dir=tmp_path,
        x=x,
        y=y,
        arch="mlp",
        epochs=2,
        record=lambda name, value, vid: outbox.add(name, value, version_id=vid),
    )
    result = personaliser.personalise(version_id=3, global_weights=global_weights)
    batch = outbox.next_batch()
    assert batch is not None
    sent = sorted((s["name"], s["value"], s.get("version_id")) for s in batch.samples)
    assert sent == [
        ("global_accuracy", pytest.approx(result.global_accuracy), 3),
        ("personal_accuracy", pytest.approx(result.personal_accuracy), 3),
    ]
    # The head's bytes are nowhere in what is queued for the server.
    head_bytes = (tmp_path / "personal" / "head.safetensors").read_bytes()
    assert len(head_bytes) > 2000
    queued = json.dumps(batch.samples).encode()
    assert head_bytes[-64:] not in queued and len(queued) < 500
    outbox.close()


def test_rebase_keeps_a_fitting_head_and_resets_an_incompatible_one(
    tmp_path: Path, global_weights: Weights, skewed_data: tuple[np.ndarray, np.ndarray]
) -> None:
    x, y = skewed_data
    personaliser = Personaliser(state_dir=tmp_path, x=x, y=y, arch="mlp", epochs=2)
    personaliser.personalise(version_id=1, global_weights=global_weights)
    # A new version with the same shapes: the personal head carries over.
    same_shape = {k: v + np.float32(0.001) for k, v in global_weights.items()}
    assert personaliser.personalise(version_id=2, global_weights=same_shape).rebase == "kept"
    # A narrower hidden layer: the old head no longer fits, it is reset and reported.
    narrower = state_to_numpy(build_model("mlp", widths=(64, 32)))
    result = personaliser.personalise(version_id=3, global_weights=narrower)
    assert result.rebase == "reset"
    meta = personaliser.meta()
    assert meta is not None and meta["rebase"] == "reset" and meta["base_version_id"] == 3
    head = personaliser.load_head()
    assert head is not None and head["fc3.weight"].shape == (10, 32)


def test_an_unreadable_head_counts_as_none(tmp_path: Path) -> None:
    personaliser = Personaliser(
        state_dir=tmp_path, x=np.zeros((4, 64), np.float32), y=np.arange(4), arch="mlp"
    )
    (tmp_path / "personal").mkdir()
    (tmp_path / "personal" / "head.safetensors").write_bytes(b"not safetensors")
    assert personaliser.load_head() is None
    assert personaliser.meta() is None


def _desired(fleet: FakeFleet, weights: Weights, *, version_id: int, tamper: bool = False) -> None:
    model = linear_onnx()
    sha, signature = SIGNER.sign(model)
    blob = encode_tensors(weights)
    wsha, wsig = SIGNER.sign(blob)
    if tamper:
        wsig = SIGNER.sign(b"something else")[1]
    fleet.server.routes[("GET", f"/api/agent/v1/artifacts/{sha}")] = lambda h, b: h.serve_bytes(
        model, etag=sha
    )
    fleet.server.routes[("GET", f"/api/agent/v1/artifacts/{wsha}")] = lambda h, b: h.serve_bytes(
        blob, etag=wsha
    )
    ref = {"url": "/api/agent/v1/artifacts/{}"}
    fleet.desired = {
        "version_id": version_id,
        "label": f"digits:v{version_id}",
        "family": "digits",
        "arch": "mlp",
        "deployment_id": None,
        "artifact": {
            **ref,
            "kind": "onnx",
            "url": ref["url"].format(sha),
            "sha256": sha,
            "size": len(model),
            "signature": signature,
        },
        "weights": {
            **ref,
            "kind": "weights",
            "url": ref["url"].format(wsha),
            "sha256": wsha,
            "size": len(blob),
            "signature": wsig,
        },
    }


@pytest.fixture
def fleet() -> Iterator[FakeFleet]:
    server = ScriptedServer()
    yield FakeFleet(server)
    server.close()


def _agent(fleet: FakeFleet, root: Path, data: tuple[np.ndarray, np.ndarray], *, on: bool) -> Agent:
    config = AgentConfig(
        server_url=fleet.server.url,
        state_dir=root,
        enrollment_token="good-token",
        websocket=False,
        personalise=on,
        personalise_epochs=3,
    )
    return Agent(config=config, rng=random.Random(0), sleep=lambda s: None, local_data=data)


def test_agent_personalises_after_activation_and_sends_only_the_accuracies(
    fleet: FakeFleet, tmp_path: Path, global_weights: Weights, skewed_data: tuple[np.ndarray, np.ndarray]
) -> None:
    _desired(fleet, global_weights, version_id=5)
    agent = _agent(fleet, tmp_path, skewed_data, on=True)
    agent.step()
    assert agent.state.current_version_id() == 5
    head_bytes = (tmp_path / "personal" / "head.safetensors").read_bytes()
    samples = [s for batch in fleet.server.posted("/api/agent/v1/metrics") for s in batch["samples"]]
    personal = {s["name"]: s for s in samples if s["name"].endswith("_accuracy")}
    assert set(personal) == {"global_accuracy", "personal_accuracy"}
    assert all(s["version_id"] == 5 for s in personal.values())
    assert personal["personal_accuracy"]["value"] > personal["global_accuracy"]["value"]
    # Nothing the agent sent carries the head: every request body is small JSON.
    for method, _, _, body in fleet.server.requests:
        assert head_bytes[-64:] not in body
        assert method == "GET" or body.startswith(b"{")
    downloads = [p for m, p, _, _ in fleet.server.requests if m == "GET"]
    agent.step()  # the same version again: no second download, no second fine-tune
    assert [p for m, p, _, _ in fleet.server.requests if m == "GET"] == downloads
    agent.close()


def test_agent_skips_weights_that_fail_verification_and_does_nothing_when_off(
    fleet: FakeFleet, tmp_path: Path, global_weights: Weights, skewed_data: tuple[np.ndarray, np.ndarray]
) -> None:
    _desired(fleet, global_weights, version_id=6, tamper=True)
    agent = _agent(fleet, tmp_path / "a", skewed_data, on=True)
    agent.step()
    agent.step()
    assert agent.state.current_version_id() == 6  # the ONNX model itself was fine
    assert not (tmp_path / "a" / "personal" / "head.safetensors").exists()
    weight_gets = [p for m, p, _, _ in fleet.server.requests if m == "GET" and "artifacts" in p]
    assert len(weight_gets) == 2  # model once, weights once: a failed check is not retried
    agent.close()
    _desired(fleet, global_weights, version_id=7)
    off = _agent(fleet, tmp_path / "b", skewed_data, on=False)
    off.step()
    assert off.state.current_version_id() == 7
    assert not (tmp_path / "b" / "personal").exists()
    off.close()
