from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.api import ServiceError
from models_registry import jobs, tasks
from models_registry.datasets import dataset_register
from models_registry.models import Artifact, EvaluationReport, ModelJob, ModelVersion
from models_registry.signing import signing_public_key_b64, verify_digest

pytestmark = pytest.mark.django_db

FAST = {"latency_repeats": 5}


def _run(job_kind: str, version: Any, django_capture_on_commit_callbacks: Any, **params: Any) -> ModelJob:
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        job = jobs.job_enqueue(kind=job_kind, version=version, params=params)
    assert len(callbacks) == 1  # the task is sent only once the row is committed
    task = {
        "evaluate": tasks.evaluate_version,
        "export": tasks.export_version,
        "optimise": tasks.optimise_version,
    }
    # The task body itself, in-process: the same code a worker runs.
    task[job_kind](job.pk)
    job.refresh_from_db()
    return job


def test_evaluate_records_a_report_and_headline_metrics(
    trained_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    job = _run("evaluate", trained_version, django_capture_on_commit_callbacks, **FAST)
    assert job.status == "succeeded", job.error
    assert job.progress == 1.0 and job.started_at and job.finished_at and "accuracy" in job.log
    report = EvaluationReport.objects.get(version=trained_version)
    assert report.dataset == "digits-test" and report.report["num_examples"] == 360
    trained_version.refresh_from_db()
    assert trained_version.metrics["accuracy"] == report.report["accuracy"] > 0.8
    assert job.result["report_id"] == report.pk
    # A second delivery of the same message does nothing.
    assert tasks.evaluate_version(job.pk) == "skipped"
    assert EvaluationReport.objects.count() == 1


def test_dataset_of_the_wrong_shape_fails_the_job_clearly(
    trained_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    rng = np.random.default_rng(0)
    dataset_register(name="wide", x=rng.random((20, 32)), y=rng.integers(0, 10, 20), num_classes=10)
    job = _run("evaluate", trained_version, django_capture_on_commit_callbacks, dataset="wide", **FAST)
    assert job.status == "failed"
    assert "shape [32]" in job.error and "expects shape [64]" in job.error
    assert not EvaluationReport.objects.exists()
    missing = _run("evaluate", trained_version, django_capture_on_commit_callbacks, dataset="nope")
    assert missing.status == "failed" and "No data set named 'nope'" in missing.error


def test_export_attaches_a_signed_onnx_with_parity(
    family: Any, demo_artifacts: tuple[bytes, bytes], django_capture_on_commit_callbacks: Any
) -> None:
    from models_registry.services import version_create

    version = version_create(family=family, weights=demo_artifacts[0])
    job = _run("export", version, django_capture_on_commit_callbacks)
    assert job.status == "succeeded", job.error
    assert job.result["parity_ok"] is True and job.result["attached"] is True
    assert job.result["max_abs_diff"] < 1e-4 and job.result["opset"] == 17
    onnx = Artifact.objects.get(version=version, kind="onnx")
    assert onnx.sha256 == job.result["onnx_sha256"] and onnx.opset == 17
    assert verify_digest(onnx.sha256, onnx.signature, signing_public_key_b64())
    # Exporting again keeps the stored artifact.
    again = _run("export", version, django_capture_on_commit_callbacks)
    assert again.status == "succeeded" and again.result["attached"] is False
    assert Artifact.objects.filter(version=version, kind="onnx").count() == 1


def test_export_that_does_not_match_torch_fails_clearly(
    family: Any,
    demo_artifacts: tuple[bytes, bytes],
    django_capture_on_commit_callbacks: Any,
    monkeypatch: Any,
) -> None:
    from models_registry.ml.export import export_module, make_trace_divergent_module
    from models_registry.services import version_create

    version = version_create(family=family, weights=demo_artifacts[0])

    # The exporter is handed a module whose traced graph differs from its eager forward
    # (the real export and parity check then run on it).
    def divergent_export(*, sample: Any, opset: int, atol: float, rtol: float, **_: Any) -> Any:
        module = make_trace_divergent_module()
        return export_module(module=module, sample_inputs=sample, opset=opset, atol=atol, rtol=rtol)

    monkeypatch.setattr(jobs, "_export", divergent_export)
    job = _run("export", version, django_capture_on_commit_callbacks)
    assert job.status == "failed"
    assert "ONNX export does not match torch" in job.error
    assert job.result["error_type"] == "ExportParityError" and job.result["max_abs_diff"] > 1e-3
    assert not Artifact.objects.filter(version=version, kind="onnx").exists()


def test_optimise_int8_dynamic_registers_an_evaluated_draft_variant(
    trained_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    job = _run("optimise", trained_version, django_capture_on_commit_callbacks, kind="int8_dynamic", **FAST)
    assert job.status == "succeeded", job.error
    variant = ModelVersion.objects.get(pk=job.result["version_id"])
    assert job.result_version_id == variant.pk
    assert (variant.parent_id, variant.source, variant.variant) == (
        trained_version.pk,
        "optimised",
        "int8_dynamic",
    )
    assert variant.stage == "draft" and variant.source_detail["job"] == job.pk
    assert variant.metrics["rejected"] is False
    assert variant.metrics["size_bytes"] < trained_version.artifacts.get(kind="onnx").size
    assert abs(variant.metrics["accuracy_drop"]) <= 0.01
    assert set(variant.artifacts.values_list("kind", flat=True)) == {"onnx"}
    # The parent was evaluated for the comparison.
    trained_version.refresh_from_db()
    assert "accuracy" in trained_version.metrics


def test_variant_losing_too_much_accuracy_is_stored_rejected_as_draft(
    trained_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    job = _run(
        "optimise",
        trained_version,
        django_capture_on_commit_callbacks,
        kind="prune_unstructured",
        amount=0.95,
        finetune_epochs=0,
        quantise=True,
        max_accuracy_drop=0.0,
        **FAST,
    )
    assert job.status == "succeeded", job.error
    assert job.result["rejected"] is True
    variant = ModelVersion.objects.get(pk=job.result["version_id"])
    assert variant.variant == "pruned_unstructured_int8" and variant.stage == "draft"
    assert variant.metrics["rejected"] is True
    assert variant.metrics["accuracy_drop"] > 0
    assert "below the parent's" in variant.metrics["rejection_reason"]
    # Pruned variants carry their (sparse) weights as well.
    assert set(variant.artifacts.values_list("kind", flat=True)) == {"onnx", "weights"}


def test_bad_parameters_are_refused_before_queueing(trained_version: Any, family: Any) -> None:
    from models_registry.services import version_create

    for params in ({"kind": "int4"}, {"kind": "fp16", "bogus": 1}, {"kind": "fp16", "max_accuracy_drop": 2}):
        with pytest.raises(ServiceError) as caught:
            jobs.job_enqueue(kind="optimise", version=trained_version, params=params)
        assert caught.value.code == "invalid_params"
    onnx_only = version_create(family=family, onnx=trained_version.artifacts.get(kind="onnx").file.read())
    with pytest.raises(ServiceError) as caught:
        jobs.job_enqueue(kind="export", version=onnx_only)
    assert caught.value.code == "no_weights"
    assert not ModelJob.objects.exists()


def test_a_stale_running_job_can_be_taken_over(trained_version: Any) -> None:
    from datetime import timedelta

    from django.utils import timezone

    job = ModelJob.objects.create(kind="evaluate", version=trained_version, params=FAST)
    assert jobs.job_claim(job_id=job.pk)
    assert not jobs.job_claim(job_id=job.pk)  # running, fresh: someone has it
    ModelJob.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    assert jobs.job_claim(job_id=job.pk)  # its worker died: the lease ran out
    job.refresh_from_db()
    assert job.attempts == 2


def test_a_job_the_broker_refuses_stays_queued_and_is_sent_again(
    trained_version: Any, monkeypatch: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from datetime import timedelta

    from celery import current_app
    from django.utils import timezone

    sent: list[tuple[str, list[Any]]] = []

    def down(name: str, args: list[Any], **_: Any) -> None:
        raise ConnectionRefusedError("broker down")

    monkeypatch.setattr(current_app, "send_task", down)
    with django_capture_on_commit_callbacks(execute=True):
        job = jobs.job_enqueue(kind="evaluate", version=trained_version, params=FAST)
    job.refresh_from_db()
    assert job.status == "queued" and job.error == ""  # the request stands; nothing is lost

    monkeypatch.setattr(current_app, "send_task", lambda name, args, **_: sent.append((name, args)))
    assert jobs.jobs_resume() == []  # too young: its message may still be on its way
    assert jobs.jobs_resume(now=timezone.now() + timedelta(minutes=6)) == [job.pk]
    assert sent == [("models_registry.evaluate_version", [job.pk])]
