"""Building ONNX Runtime training artifacts as a model job, with the pinned builder.

A version that trains gets a signed ``ort_training`` artifact; a graph with an operator
that has no gradient is marked not trainable with the operator named (also when the
gradient does not raise but kills the process), and ort-only boards are then left out;
a builder that cannot run fails the job with the reason and marks the version failed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow


def _register(family: Any, module: Any, example: Any) -> Any:
    from devices_agent.program import make_bundle
    from models_registry.services import version_create

    made = make_bundle(module, example)
    return version_create(family=family, weights=made.weights, onnx=made.onnx, program=made.program)


def _build(version: Any) -> Any:
    from models_registry.jobs import job_run, ort_training_request
    from models_registry.models import ModelJob

    job = ort_training_request(version=version)
    assert job is not None and job.kind == "ort_training" and job.status == "queued"
    job_run(job_id=job.pk)
    version.refresh_from_db()
    return ModelJob.objects.get(pk=job.pk)


def _small_family(name: str) -> Any:
    from models_registry.services import family_create

    return family_create(name=name, input_shape=[3, 16], num_classes=3)


def test_a_version_gets_signed_training_artifacts_that_the_api_shows(
    db: Any, ort_builder_python: Path, operator_client: Any
) -> None:
    from devices_agent.ort_artifacts import read_manifest
    from models_registry.jobs import ort_training_request
    from models_registry.models import Artifact
    from models_registry.signing import signing_public_key_b64, verify_digest
    from tests.bundles import digits_version

    version = digits_version()
    job = _build(version)
    assert job.status == "succeeded", job.error
    assert job.result["trainable"] is True and job.result["builder"]["onnx"] == "1.17.0"
    artifact = Artifact.objects.get(version=version, kind="ort_training")
    assert version.ort_training == {
        "status": "ready",
        "sha256": artifact.sha256,
        "builder": job.result["builder"],
        "from_version": version.pk,
    }
    assert verify_digest(artifact.sha256, artifact.signature, signing_public_key_b64())
    with artifact.file.open("rb") as handle:
        manifest = read_manifest(handle.read())
    assert manifest["trainable"] == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "fc3.weight",
        "fc3.bias",
    ]
    assert manifest["loss"] == "cross_entropy" and manifest["opset"] == 17
    shown = operator_client.get(f"/api/v1/model-versions/{version.pk}/").json()
    assert shown["ort_training"]["status"] == "ready"
    assert "ort_training" in {a["kind"] for a in shown["artifacts"]}
    # Asking again builds nothing: the artifacts exist.
    assert ort_training_request(version=version) is None
    again = operator_client.post(f"/api/v1/model-versions/{version.pk}/ort-training/")
    assert again.status_code == 200 and again.json()["ort_training"]["status"] == "ready"


def test_a_graph_with_an_operator_without_gradient_is_not_trainable_and_names_it(
    db: Any, ort_builder_python: Path, operator_client: Any
) -> None:
    import torch

    from fleet.models import Device
    from tests.training.federated.conftest import make_fleet, make_job
    from training import selectors

    class Hard(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(3, 4, 3, padding=1)
            self.head = torch.nn.Linear(4 * 16, 3)

        def forward(self, x: Any) -> Any:
            return self.head(torch.flatten(torch.nn.functional.hardswish(self.conv(x)), 1))

    version = _register(_small_family("hard"), Hard(), torch.zeros(2, 3, 16))
    job = _build(version)
    # Not trainable is an answer, not a failure of the job.
    assert job.status == "succeeded" and job.result["trainable"] is False
    record = version.ort_training
    assert record["status"] == "not_trainable" and record["code"] == "no_gradient"
    assert record["op"] == "HardSwish" and record["node"] == "/HardSwish"
    assert "HardSwish" in record["reason"]
    assert not version.artifacts.filter(kind="ort_training").exists()
    shown = operator_client.get(f"/api/v1/model-versions/{version.pk}/").json()
    assert shown["ort_training"]["op"] == "HardSwish"
    # A job on it leaves ort-only boards out, and says why.
    fleet = make_fleet(n_devices=2)
    Device.objects.filter(pk=fleet.devices[0].pk).update(
        state={**fleet.devices[0].state, "training_backends": ["ort"]}
    )
    federated = make_job(fleet)
    assert selectors.ort_unusable(job=federated, version=version) == "ort_not_trainable"


def test_a_gradient_that_kills_the_process_is_found_by_probing(db: Any, ort_builder_python: Path) -> None:
    """AveragePool's gradient divides by zero with a variable batch: a crash, no message."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv1d(3, 4, 3, padding=1)
            self.head = torch.nn.Linear(4 * 8, 3)

        def forward(self, x: Any) -> Any:
            pooled = torch.nn.functional.avg_pool1d(torch.relu(self.conv(x)), 2)
            return self.head(torch.flatten(pooled, 1))

    version = _register(_small_family("pooled"), Pooled(), torch.zeros(2, 3, 16))
    _build(version)
    record = version.ort_training
    assert record["status"] == "not_trainable" and record["op"] == "AveragePool", record


def test_a_builder_that_cannot_run_fails_the_job_and_says_why(db: Any, settings: Any, tmp_path: Path) -> None:
    from tests.bundles import digits_version

    settings.ORT_BUILDER_PYTHON = str(tmp_path / "no-such-python")
    version = digits_version()
    job = _build(version)
    assert job.status == "failed" and "builder" in job.error
    assert version.ort_training["status"] == "failed" and "no-such-python" in version.ort_training["reason"]
