from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.api import ServiceError
from models_registry import jobs, tasks
from models_registry.datasets import dataset_register
from models_registry.models import Artifact, EvaluationReport, ModelJob, ModelVersion
from models_registry.signing import signing_public_key_b64, verify_digest
from tests.bundles import digits_bundle

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


def _refused(job_kind: str, version: Any, code: str, **params: Any) -> ServiceError:
    with pytest.raises(ServiceError) as caught:
        jobs.job_enqueue(kind=job_kind, version=version, params=params)
    assert caught.value.code == code, caught.value.message
    assert not ModelJob.objects.exists()
    return caught.value


def _kinds(version: Any) -> set[str]:
    return set(version.artifacts.values_list("kind", flat=True))


def test_evaluate_records_a_report_and_headline_metrics(
    trained_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    job = _run("evaluate", trained_version, django_capture_on_commit_callbacks, **FAST)
    assert job.status == "succeeded", job.error
    assert job.progress == 1.0 and job.started_at and job.finished_at and "accuracy" in job.log
    report = EvaluationReport.objects.get(version=trained_version)
    assert report.dataset == "digits-mlp-test" and report.report["num_examples"] == 360
    trained_version.refresh_from_db()
    assert trained_version.metrics["accuracy"] == report.report["accuracy"] > 0.8
    assert job.result["report_id"] == report.pk
    # A second delivery of the same message does nothing.
    assert tasks.evaluate_version(job.pk) == "skipped"
    assert EvaluationReport.objects.count() == 1


def test_a_family_without_a_test_set_is_evaluated_on_the_boards(family: Any, trained_bundle: Any) -> None:
    from models_registry.services import version_create

    version = version_create(family=family, weights=trained_bundle.weights, onnx=trained_bundle.onnx)
    error = _refused("evaluate", version, "no_dataset")
    assert "no test set" in error.message and "federated" in error.message
    assert error.details["evaluation"] == "federated"


def test_a_data_set_that_does_not_fit_is_refused_clearly(trained_version: Any) -> None:
    rng = np.random.default_rng(0)
    dataset_register(name="wide", x=rng.random((20, 32)), y=rng.integers(0, 10, 20), num_classes=10)
    error = _refused("evaluate", trained_version, "dataset_mismatch", dataset="wide")
    assert "shape [32]" in error.message and "expects shape [64]" in error.message
    missing = _refused("evaluate", trained_version, "no_dataset", dataset="nope")
    assert "No data set named 'nope'" in missing.message
    train = _refused("evaluate", trained_version, "wrong_split", dataset="digits-mlp-train")
    assert "train set" in train.message
    assert not EvaluationReport.objects.exists()


def _weights_only_child(family: Any, parent: Any, bundle: Any) -> Any:
    from models_registry.services import version_create

    return version_create(
        family=family, weights=bundle.weights, program=bundle.program, parent=parent, head=bundle.head
    )


def test_export_writes_the_weights_into_the_ancestors_graph(
    family: Any,
    family_datasets: Any,
    mlp_bundle: Any,
    trained_bundle: Any,
    digits: Any,
    django_capture_on_commit_callbacks: Any,
) -> None:
    from models_registry.ml.evaluate import run_onnx
    from models_registry.services import version_create

    parent = version_create(
        family=family, weights=mlp_bundle.weights, onnx=mlp_bundle.onnx, program=mlp_bundle.program
    )
    # A version made elsewhere from new weights only (a program and its weights, no graph).
    middle = _weights_only_child(family, parent, digits_bundle("mlp", seed=3))
    child = _weights_only_child(family, middle, trained_bundle)
    job = _run("export", child, django_capture_on_commit_callbacks)
    assert job.status == "succeeded", job.error
    assert job.result["attached"] is True and job.result["ancestor"] == parent.pk
    assert job.result["max_abs_diff"] < 1e-4 and job.result["parity_ok"] is True
    onnx = Artifact.objects.get(version=child, kind="onnx")
    assert onnx.sha256 == job.result["onnx_sha256"] and onnx.opset == 17
    assert verify_digest(onnx.sha256, onnx.signature, signing_public_key_b64())
    # The new graph computes what the trained bundle's own graph computes.
    _, _, x_test, _ = digits
    with onnx.file.open("rb") as handle:
        got = run_onnx(handle.read(), x_test)
    assert np.allclose(got, run_onnx(trained_bundle.onnx, x_test), atol=1e-4)
    # Exporting again keeps the stored artifact.
    again = _run("export", child, django_capture_on_commit_callbacks)
    assert again.status == "succeeded" and again.result["attached"] is False
    assert Artifact.objects.filter(version=child, kind="onnx").count() == 1
    # A version with weights and a program but no graph of its own is evaluated through its ancestor's.
    evaluated = _run("evaluate", middle, django_capture_on_commit_callbacks, **FAST)
    assert evaluated.status == "succeeded", evaluated.error
    assert not Artifact.objects.filter(version=middle, kind="onnx").exists()


def test_an_export_that_does_not_match_the_program_fails_with_the_numbers(
    family: Any,
    mlp_bundle: Any,
    trained_bundle: Any,
    django_capture_on_commit_callbacks: Any,
    monkeypatch: Any,
) -> None:
    from models_registry.ml import onnx_weights
    from models_registry.services import version_create

    parent = version_create(
        family=family, weights=mlp_bundle.weights, onnx=mlp_bundle.onnx, program=mlp_bundle.program
    )
    child = _weights_only_child(family, parent, trained_bundle)
    # A graph writer that silently keeps the old weights: the check against the program catches it.
    monkeypatch.setattr(onnx_weights, "onnx_with_weights", lambda graph, weights: graph)
    job = _run("export", child, django_capture_on_commit_callbacks)
    assert job.status == "failed"
    assert "does not match its program" in job.error and "max |diff|" in job.error
    assert job.result["code"] == "onnx_mismatch" and job.result["max_abs_diff"] > 1e-3
    assert job.result["atol"] == 1e-4 and job.result["ancestor"] == parent.pk
    assert not Artifact.objects.filter(version=child, kind="onnx").exists()


def test_export_needs_weights_a_program_and_a_graph_to_write_into(
    family: Any, mlp_bundle: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from models_registry.services import version_create

    onnx_only = version_create(family=family, onnx=mlp_bundle.onnx)
    _refused("export", onnx_only, "no_weights")
    weights_only = version_create(family=family, weights=mlp_bundle.weights)
    _refused("export", weights_only, "no_program")
    orphan = version_create(family=family, weights=mlp_bundle.weights, program=mlp_bundle.program)
    job = _run("export", orphan, django_capture_on_commit_callbacks)
    assert job.status == "failed" and job.result["code"] == "no_graph"
    assert "No ancestor" in job.error


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
    assert variant.metrics["rejected"] is False and variant.metrics["metric"] == "accuracy"
    assert variant.metrics["size_bytes"] < trained_version.artifacts.get(kind="onnx").size
    assert abs(variant.metrics["metric_drop"]) <= 0.01
    assert variant.metrics["accuracy_drop"] == variant.metrics["metric_drop"]
    assert _kinds(variant) == {"onnx"}
    # The parent was evaluated for the comparison.
    trained_version.refresh_from_db()
    assert "accuracy" in trained_version.metrics


def test_int8_static_calibrates_on_the_family_train_set(
    trained_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    job = _run("optimise", trained_version, django_capture_on_commit_callbacks, kind="int8_static", **FAST)
    assert job.status == "succeeded", job.error
    variant = ModelVersion.objects.get(pk=job.result["version_id"])
    assert variant.source_detail["train_dataset"] == "digits-mlp-train"
    assert variant.source_detail["details"]["metric"] == "accuracy"
    assert _kinds(variant) == {"onnx"}


def test_kinds_that_train_need_a_train_set(family: Any, trained_bundle: Any) -> None:
    from models_registry.datasets import dataset_load
    from models_registry.services import version_create

    x, y = dataset_load(_test_only(family))
    version = version_create(
        family=family,
        weights=trained_bundle.weights,
        onnx=trained_bundle.onnx,
        program=trained_bundle.program,
    )
    for kind in ("int8_static", "prune_unstructured"):
        error = _refused("optimise", version, "no_dataset", kind=kind)
        assert "no train data set" in error.message and "split=train" in error.message
    assert len(x) == len(y) == 360


def _test_only(family: Any) -> Any:
    from config.demo.seed import digits_datasets
    from models_registry.models import EvaluationDataset

    test, train = digits_datasets(family=family)
    EvaluationDataset.objects.filter(pk=train.pk).delete()
    return test


def test_unstructured_pruning_keeps_the_program_and_writes_the_graph_by_name(
    trained_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    import onnx
    from onnx import numpy_helper

    from models_registry.evaluation import version_state

    job = _run(
        "optimise",
        trained_version,
        django_capture_on_commit_callbacks,
        kind="prune_unstructured",
        amount=0.5,
        finetune_epochs=2,
        **FAST,
    )
    assert job.status == "succeeded", job.error
    variant = ModelVersion.objects.get(pk=job.result["version_id"])
    assert variant.variant == "pruned_unstructured" and _kinds(variant) == {"onnx", "weights", "program"}
    assert variant.head == trained_version.head
    program = variant.artifacts.get(kind="program")
    assert program.sha256 == trained_version.artifacts.get(kind="program").sha256
    weights = version_state(variant)
    assert weights is not None
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert np.mean(weights[name] == 0) == pytest.approx(0.5, abs=0.01)
    assert np.all(weights["fc1.bias"] != 0)  # biases are not pruned
    with variant.artifacts.get(kind="onnx").file.open("rb") as handle:
        model = onnx.load_model_from_string(handle.read())
    by_name = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    assert np.array_equal(by_name["fc2.weight"], weights["fc2.weight"])
    assert variant.metrics["rejected"] is False, variant.metrics
    assert variant.source_detail["details"]["sparsity"] == pytest.approx(0.5, abs=0.01)


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
    assert variant.metrics["accuracy_drop"] > 0 and variant.metrics["max_metric_drop"] == 0.0
    assert "below the parent's" in variant.metrics["rejection_reason"]
    # The quantised graph no longer holds the weights by name: they travel without a program.
    assert _kinds(variant) == {"onnx", "weights"}


def test_distillation_trains_the_students_program(
    trained_version: Any, family: Any, django_capture_on_commit_callbacks: Any
) -> None:
    from tests.bundles import digits_version

    student = digits_version(family, arch="mlp_small")
    job = _run(
        "optimise",
        trained_version,
        django_capture_on_commit_callbacks,
        kind="distil",
        student_version=student.pk,
        epochs=10,
        lr=0.01,
        max_metric_drop=1.0,
        **FAST,
    )
    assert job.status == "succeeded", job.error
    variant = ModelVersion.objects.get(pk=job.result["version_id"])
    assert variant.parent_id == trained_version.pk and variant.variant == "distilled"
    assert variant.source_detail["student_version"] == student.pk
    assert variant.artifacts.get(kind="program").sha256 == student.artifacts.get(kind="program").sha256
    assert variant.head == student.head == ["fc2.weight", "fc2.bias"]
    details = variant.source_detail["details"]
    assert details["student_params"] < 0.5 * details["teacher_params"]
    assert variant.metrics["accuracy"] > 0.7
    trained_version.refresh_from_db()
    assert variant.metrics["size_bytes"] < trained_version.metrics["size_bytes"]


def test_distillation_needs_a_fitting_student(trained_version: Any, trained_bundle: Any, db: Any) -> None:
    from config.demo.nets import spec_fields
    from models_registry.services import family_create, version_create

    _refused("optimise", trained_version, "no_student", kind="distil")
    _refused("optimise", trained_version, "invalid_student", kind="distil", student_version=999_999)
    other = family_create(name="other-digits", **spec_fields("mlp"))
    stranger = version_create(
        family=other, weights=trained_bundle.weights, onnx=trained_bundle.onnx, program=trained_bundle.program
    )
    error = _refused(
        "optimise", trained_version, "invalid_student", kind="distil", student_version=stranger.pk
    )
    assert "another family" in error.message
    graph_only = version_create(family=trained_version.family, onnx=trained_bundle.onnx)
    _refused("optimise", trained_version, "invalid_student", kind="distil", student_version=graph_only.pk)


def test_structured_pruning_is_refused_with_the_reason(trained_version: Any) -> None:
    error = _refused("optimise", trained_version, "not_supported", kind="prune_structured")
    assert "layer widths" in error.message


def test_bad_parameters_are_refused_before_queueing(trained_version: Any, family: Any) -> None:
    from models_registry.services import version_create

    for params in (
        {"kind": "int4"},
        {"kind": "fp16", "bogus": 1},
        {"kind": "fp16", "max_accuracy_drop": 2},
        {"kind": "fp16", "max_accuracy_drop": 0.1, "max_metric_drop": 0.2},
        {"kind": "fp16", "student_version": trained_version.pk},
        {"kind": "fp16", "student_arch": "mlp_small"},
    ):
        _refused("optimise", trained_version, "invalid_params", **params)
    onnx_only = version_create(family=family, onnx=trained_version.artifacts.get(kind="onnx").file.read())
    _refused("optimise", onnx_only, "no_weights", kind="prune_unstructured")


def test_max_metric_drop_is_the_new_name_of_max_accuracy_drop(
    trained_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    job = _run(
        "optimise",
        trained_version,
        django_capture_on_commit_callbacks,
        kind="fp16",
        max_metric_drop=0.05,
        **FAST,
    )
    assert job.status == "succeeded", job.error
    assert job.result["max_metric_drop"] == job.result["max_accuracy_drop"] == 0.05


def test_regression_variants_are_judged_on_mae(
    regression_version: Any, django_capture_on_commit_callbacks: Any
) -> None:
    job = _run("optimise", regression_version, django_capture_on_commit_callbacks, kind="fp16", **FAST)
    assert job.status == "succeeded", job.error
    assert job.result["metric"] == "mae" and "accuracy_drop" not in job.result
    assert abs(job.result["metric_drop"]) < 0.01 and job.result["rejected"] is False
    regression_version.refresh_from_db()
    assert job.result["parent_metric"] == regression_version.metrics["mae"]
    pruned = _run(
        "optimise",
        regression_version,
        django_capture_on_commit_callbacks,
        kind="prune_unstructured",
        amount=0.9,
        finetune_epochs=0,
        max_metric_drop=0.0,
        **FAST,
    )
    assert pruned.status == "succeeded", pruned.error
    assert pruned.result["rejected"] is True and pruned.result["metric_drop"] > 0
    assert (
        "mae" in pruned.result["rejection_reason"]
        and "above the parent's" in pruned.result["rejection_reason"]
    )
    # For regression the allowed worsening is in mae's units, not bounded by 1.
    with django_capture_on_commit_callbacks(execute=False):
        jobs.job_enqueue(
            kind="optimise", version=regression_version, params={"kind": "fp16", "max_metric_drop": 3.0}
        )


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
    grace = timedelta(seconds=120)
    assert jobs.jobs_redrive(now=timezone.now(), grace=grace) == []  # its message may be on its way
    assert jobs.jobs_redrive(now=timezone.now() + timedelta(seconds=121), grace=grace) == [job.pk]
    assert sent == [("models_registry.evaluate_version", [job.pk])]


def test_the_sweep_re_drives_lost_jobs_but_never_one_under_a_live_lease(
    trained_version: Any, monkeypatch: Any, settings: Any
) -> None:
    """Queued past SWEEP_GRACE_S, or running past its lease: sent again; held: never."""
    from datetime import timedelta

    from celery import current_app
    from django.utils import timezone

    from core.sweep import sweep

    settings.SWEEP_GRACE_S = 60
    sent: list[tuple[str, list[Any]]] = []
    monkeypatch.setattr(current_app, "send_task", lambda name, args, **_: sent.append((name, args)))
    old = timezone.now() - timedelta(seconds=61)
    fresh = ModelJob.objects.create(kind="evaluate", version=trained_version, params=FAST)
    lost = ModelJob.objects.create(kind="export", version=trained_version, params={})
    held = ModelJob.objects.create(kind="evaluate", version=trained_version, params=FAST)
    dead = ModelJob.objects.create(kind="optimise", version=trained_version, params={"kind": "fp16"})
    finished = ModelJob.objects.create(kind="evaluate", version=trained_version, params=FAST)
    ModelJob.objects.filter(pk__in=[lost.pk, held.pk, dead.pk, finished.pk]).update(created_at=old)
    assert jobs.job_claim(job_id=held.pk) and jobs.job_claim(job_id=dead.pk)
    ModelJob.objects.filter(pk=dead.pk).update(lease_expires_at=timezone.now() - timedelta(seconds=1))
    ModelJob.objects.filter(pk=finished.pk).update(status="succeeded")

    assert sweep()["models_registry.jobs"] == [lost.pk, dead.pk]
    assert sent == [
        ("models_registry.export_version", [lost.pk]),
        ("models_registry.optimise_version", [dead.pk]),
    ]
    assert fresh.pk and held.pk  # too young, and held by a live worker: left alone
    assert sweep()["models_registry.jobs"] == []  # re-sent at most once per grace
    ModelJob.objects.filter(pk=lost.pk).update(redriven_at=timezone.now() - timedelta(seconds=61))
    assert sweep()["models_registry.jobs"] == [lost.pk]
