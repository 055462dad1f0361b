"""The registry's evaluation service, shared by its jobs and by federated rounds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.api import ServiceError

pytestmark = pytest.mark.django_db


def test_version_evaluate_defaults_to_digits_test_and_merges_the_headline(trained_version: Any) -> None:
    from models_registry.evaluation import version_evaluate
    from models_registry.models import EvaluationDataset

    trained_version.metrics = {"rejected": False}
    trained_version.save(update_fields=["metrics"])
    assert not EvaluationDataset.objects.exists()
    evaluation = version_evaluate(version=trained_version, latency_repeats=3)
    assert evaluation.report.dataset == "digits-test" and evaluation.report.report["num_examples"] == 360
    trained_version.refresh_from_db()
    assert trained_version.metrics["accuracy"] == evaluation.headline["accuracy"] > 0.8
    assert (
        trained_version.metrics["rejected"] is False and trained_version.metrics["dataset"] == "digits-test"
    )


def test_weights_not_registered_yet_are_exported_and_evaluated(
    family: Any, mlp_weights: dict[str, np.ndarray], mlp_safetensors: bytes
) -> None:
    from models_registry.evaluation import onnx_export, version_evaluate
    from models_registry.services import version_create

    version = version_create(family=family, weights=mlp_safetensors)
    with pytest.raises(ServiceError, match="no ONNX model"):
        version_evaluate(version=version, latency_repeats=3)
    onnx = onnx_export(family=family, arch="mlp", weights=mlp_weights)
    report = version_evaluate(version=version, latency_repeats=3, onnx_bytes=onnx).report
    assert report.version_id == version.pk and len(report.report["confusion_matrix"]) == 10


def test_a_data_set_that_does_not_fit_the_family_is_refused(db: Any) -> None:
    from models_registry.evaluation import evaluation_dataset
    from models_registry.services import family_create

    wide = family_create(name="wide", arch="custom", input_shape=[32], num_classes=10, actor=None)
    with pytest.raises(ServiceError) as refused:
        evaluation_dataset(family=wide)
    assert refused.value.code == "dataset_mismatch"
    with pytest.raises(ServiceError, match="No data set named 'nope'"):
        evaluation_dataset(family=wide, name="nope")
