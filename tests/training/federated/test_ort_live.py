"""Torch boards and a torch-less board learning in the same rounds, through the live stack.

Every board is a real ``flotilla-agent run`` process: two from the project's environment
(PyTorch), one from a virtualenv with only the agent, ONNX Runtime's training build and
the agent's dependencies (``torchless_board``: torch is not importable there). Each reads
its own examples from a data directory. The version's ORT training artifacts are built by
the stack's worker (a model job asked for through the API) in the pinned builder.

- the digits MLP (central evaluation on the family's test set) and the activity 1-D CNN
  (no test set: every version is judged on the boards' holdouts, the torch-less board's
  included) each train for two rounds that aggregate both kinds of update;
- the torch-less board is handed artifacts whose digest does not match, then whose
  checkpoint does not fit the weights: each time it reports the failure, the server
  records why, and the round aggregates the others (a stored digest signature of
  something else changes nothing: boards check the statement signed as the task is served).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]


def _wait(check: Callable[[], bool], *, timeout: float, what: str, logs: Callable[[], str] = str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{logs()[-6000:]}")


@dataclass
class Boards:
    """The board processes of a test and their logs."""

    root: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def start(
        self,
        *,
        name: str,
        server_url: str,
        token: str,
        x: np.ndarray,
        y: np.ndarray,
        seed: int,
        torchless: Any = None,
    ) -> None:
        data_dir = self.root / name / "data"
        data_dir.mkdir(parents=True)
        np.savez(data_dir / "examples.npz", x=x, y=y)
        config = self.root / name / "agent.json"
        config.write_text(
            json.dumps(
                {
                    "server_url": server_url,
                    "allow_insecure_http": True,
                    "state_dir": str(self.root / name / "state"),
                    "enrollment_token": token,
                    "name": name,
                    "heartbeat_interval_s": 1.0,
                    "health_check_runs": 3,
                    "personalise": False,
                    "drift_every": 0,
                    "device_seed": seed,
                    "data_dir": str(data_dir),
                    "training_backends": ["ort"] if torchless is not None else ["torch"],
                }
            )
        )
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        if torchless is not None:
            # Run from a directory of its own: nothing of this checkout on its path.
            command = [str(torchless.python), "-m", "devices_agent", "run", "--config", str(config)]
            env, cwd = torchless.env, self.root / name
        else:
            command = [sys.executable, "-m", "devices_agent", "run", "--config", str(config)]
            env, cwd = dict(os.environ), REPO
        self.processes.append(
            subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        )
        self.names.append(name)

    def logs(self) -> str:
        return "\n".join(
            f"--- {name}\n" + (self.root / f"{name}.log").read_text(errors="replace")[-2500:]
            for name in self.names
        )

    def stop(self) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def boards(tmp_path: Path) -> Iterator[Boards]:
    started = Boards(root=tmp_path)
    try:
        yield started
    finally:
        started.stop()


def _digits_version() -> Any:
    from config.demo.seed import digits_datasets
    from tests.bundles import digits_family, digits_version

    family = digits_family("digits-ort")
    digits_datasets(family=family)
    return digits_version(family)


def _activity_version() -> Any:
    from config.demo.nets import bundle, spec_fields
    from models_registry.services import family_create, version_create

    family = family_create(name="activity-ort", **spec_fields("activity"))
    made = bundle("activity")
    return version_create(
        family=family, weights=made.weights, onnx=made.onnx, program=made.program, head=made.head
    )


def _data(family: str, index: int) -> tuple[np.ndarray, np.ndarray]:
    from devices_agent.data import activity_windows, client_dataset

    if family == "digits":
        x, y = client_dataset(client_index=index, n_clients=3, alpha=0.5, seed=0)
    else:
        x, y = activity_windows(user=index, n=150, seed=0)
    return np.asarray(x, np.float32), np.asarray(y, np.int64)


def _fleet(boards: Boards, *, family: str, url: str, torchless: Any) -> Any:
    """Two torch boards and one torch-less board enrolled in a group, reporting their examples."""
    from fleet.models import Device, DeviceGroup, UpdatePolicy
    from fleet.services.enrollment import enrollment_token_create

    policy = UpdatePolicy.objects.create(name=f"{family}-lab", training={"allowed": True})
    group = DeviceGroup.objects.create(name=f"{family}-boards", policy=policy)
    _, token = enrollment_token_create(actor=None, name=family, group=group, max_uses=3)
    for index in range(3):
        x, y = _data(family, index)
        is_torchless = index == 2
        boards.start(
            name=f"{family}-{'ort' if is_torchless else 'torch'}-{index}",
            server_url=url,
            token=token,
            x=x,
            y=y,
            seed=index,
            torchless=torchless if is_torchless else None,
        )
    _wait(
        lambda: Device.objects.filter(groups=group, state__local_examples__gte=50).count() == 3,
        timeout=120,
        what="three boards enrolled and reporting their examples",
        logs=boards.logs,
    )
    reported = dict(Device.objects.filter(groups=group).values_list("name", "hardware__training_backends"))
    assert reported == {
        f"{family}-torch-0": ["torch"],
        f"{family}-torch-1": ["torch"],
        f"{family}-ort-2": ["ort"],
    }, reported
    return group


def _api(url: str) -> Any:
    import httpx
    from django.contrib.auth.models import User
    from rest_framework.authtoken.models import Token

    # A superuser: the role groups made by migrations do not survive an earlier live test's flush.
    user = User.objects.create_superuser(username=f"ops{User.objects.count()}", password="pw-Flotilla-1")
    token = Token.objects.create(user=user).key
    return httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=60)


def _run_job(version: Any, group: Any, *, rounds: int, quorum: int, logs: Callable[[], str]) -> Any:
    from training import services
    from training.models import FederatedJob

    job = services.job_create(
        actor=None,
        family=version.family,
        base_version=version,
        target_group=group,
        rounds=rounds,
        min_clients=3,
        quorum=quorum,
        local_epochs=2,
        lr=0.05,
        codec="int8",
        round_deadline_s=90,
    )
    services.job_start(job_id=job.pk, actor=None)
    _wait(
        lambda: FederatedJob.objects.get(pk=job.pk).status in ("succeeded", "failed"),
        timeout=300,
        what=f"job {job.pk}",
        logs=logs,
    )
    job.refresh_from_db()
    assert job.status == "succeeded", (job.error, logs()[-4000:])
    return job


@pytest.mark.parametrize("family", ["digits", "activity"])
def test_torch_and_torchless_boards_train_in_the_same_rounds(
    family: str,
    transactional_db: Any,
    live_stack: Any,
    torchless_board: Any,
    ort_builder_python: Path,
    boards: Boards,
) -> None:
    from models_registry.models import ModelVersion
    from training.models import ClientUpdate, FederatedRound

    version = _digits_version() if family == "digits" else _activity_version()
    api = _api(live_stack.url)
    asked = api.post(f"/api/v1/model-versions/{version.pk}/ort-training/")
    assert asked.status_code == 202 and asked.json()["kind"] == "ort_training", asked.text
    _wait(
        lambda: ModelVersion.objects.get(pk=version.pk).ort_training.get("status") not in (None, "pending"),
        timeout=300,
        what="the worker to build the ORT training artifacts",
        logs=lambda: live_stack.log("worker"),
    )
    version.refresh_from_db()
    assert version.ort_training["status"] == "ready", version.ort_training
    group = _fleet(boards, family=family, url=live_stack.url, torchless=torchless_board)
    job = _run_job(version, group, rounds=2, quorum=3, logs=boards.logs)

    rounds = list(FederatedRound.objects.filter(job=job).order_by("number"))
    train = [r for r in rounds if r.kind == "train"]
    assert [r.status for r in rounds] == ["done"] * len(rounds) and len(train) == 2
    for rnd in train:
        updates = ClientUpdate.objects.filter(round=rnd)
        assert sorted(updates.values_list("status", "backend")) == [
            ("accepted", "ort"),
            ("accepted", "torch"),
            ("accepted", "torch"),
        ], list(updates.values("reason_code", "reason_message"))
        ort = updates.get(backend="ort")
        assert ort.device.name == f"{family}-ort-2" and ort.metrics["backend_ort"] == 1.0
        assert ort.metrics["steps"] > 0 and ort.norm and ort.norm > 0
        assert ort.metrics["initial_loss"] > 0 and f"holdout_{rnd.metric_name or 'accuracy'}" in ort.metrics
        assert rnd.version is not None and rnd.metric is not None
        # Every version of the job trains from the first one's artifacts: the same graph.
        assert rnd.version.ort_training["from_version"] == version.pk
    shown = api.get(f"/api/v1/federated-jobs/{job.pk}/rounds/").json()
    listed = shown["results"] if isinstance(shown, dict) else shown
    assert [r["backends"] for r in listed if r["kind"] == "train"] == [{"torch": 2, "ort": 1}] * 2
    if family == "activity":
        # No test set: the torch-less board judged the versions on its holdout as well.
        assert train[0].evaluation == "federated" and train[0].evaluation_detail["devices"] == 3
        final = rounds[-1]
        assert final.kind == "evaluate"
        assert ClientUpdate.objects.filter(
            round=final, status="accepted", device__name="activity-ort-2"
        ).exists()
    else:
        assert train[-1].evaluation == "central" and train[-1].metric > 0.3


def test_a_torchless_board_reports_artifacts_it_cannot_trust_or_use_and_rounds_go_on(
    transactional_db: Any,
    live_stack: Any,
    torchless_board: Any,
    ort_builder_python: Path,
    boards: Boards,
    tmp_path: Path,
) -> None:
    import torch
    from django.core.files.storage import default_storage

    from config.demo.nets import build_model
    from devices_agent.program import make_bundle
    from models_registry.models import Artifact, ModelVersion
    from models_registry.ort_training import ort_training_build
    from models_registry.services import artifact_add
    from models_registry.signing import sign_digest
    from tests.ort_helpers import build_archive
    from training.models import ClientUpdate

    version = _digits_version()
    assert ort_training_build(version=version)["trainable"] is True
    version.refresh_from_db()
    artifact = Artifact.objects.get(version=version, kind="ort_training")
    good = default_storage.open(artifact.file.name, "rb").read()
    group = _fleet(boards, family="digits", url=live_stack.url, torchless=torchless_board)

    def one_round(expected_code: str, message: str) -> None:
        job = _run_job(version, group, rounds=1, quorum=2, logs=boards.logs)
        updates = ClientUpdate.objects.filter(round__job=job, round__number=1)
        assert sorted(updates.values_list("status", "backend")) == [
            ("accepted", "torch"),
            ("accepted", "torch"),
            ("rejected", "ort"),
        ]
        failed = updates.get(status="rejected")
        assert failed.device.name == "digits-ort-2" and failed.reason_code == expected_code
        assert message in failed.reason_message, failed.reason_message
        assert failed.round.status == "done" and failed.round.rejected == 1 and failed.round.participants == 2

    # 1. The stored bytes changed after signing (same size): the digest does not match.
    tampered = bytearray(good)
    tampered[len(tampered) // 2] ^= 0xFF
    with open(default_storage.path(artifact.file.name), "wb") as handle:
        handle.write(bytes(tampered))
    one_round("artifact_unverified", "SHA-256 mismatch")
    with open(default_storage.path(artifact.file.name), "wb") as handle:
        handle.write(good)

    # 2. The stored digest signature replaced by one of something else: boards check the
    # statement signed as the task is served, so the round goes on undisturbed.
    Artifact.objects.filter(pk=artifact.pk).update(signature=sign_digest("0" * 64))
    job = _run_job(version, group, rounds=1, quorum=2, logs=boards.logs)
    updates = ClientUpdate.objects.filter(round__job=job, round__number=1)
    assert sorted(updates.values_list("status", "backend")) == [
        ("accepted", "ort"),
        ("accepted", "torch"),
        ("accepted", "torch"),
    ]
    Artifact.objects.filter(pk=artifact.pk).update(signature=artifact.signature)

    # 3. Valid, signed artifacts of a narrower net: the checkpoint does not fit the weights.
    narrow = make_bundle(build_model("mlp", widths=(32, 32)), torch.zeros(2, 64))
    archive, _ = build_archive(
        ort_builder_python,
        onnx=narrow.onnx,
        spec=version.family.spec,
        trainable=narrow.parameters,
        folder=tmp_path / "narrow",
    )
    assert archive is not None
    Artifact.objects.filter(pk=artifact.pk).delete()
    other = artifact_add(version=version, kind="ort_training", data=archive)
    ModelVersion.objects.filter(pk=version.pk).update(
        ort_training={**version.ort_training, "sha256": other.sha256}
    )
    one_round("artifacts_mismatch", "fc1.weight is (32, 64) in the checkpoint, (64, 64) in the weights")
