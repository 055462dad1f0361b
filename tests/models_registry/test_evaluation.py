"""The registry's evaluation service, shared by its jobs and by federated rounds."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from core.api import ServiceError

pytestmark = pytest.mark.django_db


def test_version_evaluate_defaults_to_the_family_test_set_and_merges_the_headline(
    trained_version: Any,
) -> None:
    from models_registry.evaluation import version_evaluate

    trained_version.metrics = {"rejected": False}
    trained_version.save(update_fields=["metrics"])
    evaluation = version_evaluate(version=trained_version, latency_repeats=3)
    assert evaluation.report.dataset == "digits-mlp-test" and evaluation.report.report["num_examples"] == 360
    trained_version.refresh_from_db()
    assert trained_version.metrics["accuracy"] == evaluation.headline["accuracy"] > 0.8
    assert trained_version.metrics["rejected"] is False
    assert trained_version.metrics["dataset"] == "digits-mlp-test"


def test_the_newest_test_set_of_the_family_is_the_default(trained_version: Any, digits: Any) -> None:
    from models_registry.datasets import dataset_register
    from models_registry.evaluation import evaluation_dataset

    _, _, x_test, y_test = digits
    newer = dataset_register(
        name="digits-mlp-test-2", x=x_test[:100], y=y_test[:100], family=trained_version.family
    )
    assert evaluation_dataset(family=trained_version.family) == newer


def test_without_a_test_set_evaluation_is_federated(family: Any, mlp_bundle: Any) -> None:
    from models_registry.evaluation import evaluation_dataset, version_evaluate
    from models_registry.services import version_create

    version = version_create(family=family, weights=mlp_bundle.weights, onnx=mlp_bundle.onnx)
    assert evaluation_dataset(family=family) is None
    with pytest.raises(ServiceError) as refused:
        version_evaluate(version=version, latency_repeats=3)
    assert refused.value.code == "no_dataset" and "federated" in refused.value.message


def test_weights_without_a_graph_are_evaluated_in_the_ancestors_graph(
    family: Any, family_datasets: Any, mlp_bundle: Any, trained_bundle: Any
) -> None:
    from models_registry.evaluation import version_evaluate
    from models_registry.services import version_create

    parent = version_create(
        family=family, weights=mlp_bundle.weights, onnx=mlp_bundle.onnx, program=mlp_bundle.program
    )
    child = version_create(
        family=family, weights=trained_bundle.weights, program=trained_bundle.program, parent=parent
    )
    report = version_evaluate(version=child, latency_repeats=3).report
    assert report.version_id == child.pk and report.report["accuracy"] > 0.8
    baseline = version_evaluate(version=parent, latency_repeats=3).report
    assert baseline.report["accuracy"] < report.report["accuracy"]
    lonely = version_create(family=family, weights=trained_bundle.weights)
    with pytest.raises(ServiceError) as refused:
        version_evaluate(version=lonely, latency_repeats=3)
    assert refused.value.code == "no_artifacts"


def test_a_data_set_that_does_not_fit_the_family_is_refused(family_datasets: Any) -> None:
    from models_registry.evaluation import evaluation_dataset
    from models_registry.services import family_create

    wide = family_create(name="wide", arch="custom", input_shape=[32], num_classes=10, actor=None)
    with pytest.raises(ServiceError) as refused:
        evaluation_dataset(family=wide, name="digits-mlp-test")
    assert refused.value.code == "dataset_mismatch"
    with pytest.raises(ServiceError, match="No data set named 'nope'"):
        evaluation_dataset(family=wide, name="nope")
    regress = family_create(name="regress-64", task="regression", input_shape=[64], output_size=10)
    with pytest.raises(ServiceError) as regression:
        evaluation_dataset(family=regress, name="digits-mlp-test")
    assert regression.value.code == "dataset_mismatch" and "regression targets" in regression.value.message


def test_a_regression_family_is_evaluated_on_mae(regression_version: Any) -> None:
    from models_registry.evaluation import version_evaluate

    evaluation = version_evaluate(version=regression_version, latency_repeats=3)
    report = evaluation.report.report
    assert evaluation.report.dataset == "regress-test" and report["output_size"] == 2
    assert report["mae"] < 0.2 and report["rmse"] >= report["mae"] and len(report["r2"]) == 2
    assert "accuracy" not in evaluation.headline
    regression_version.refresh_from_db()
    assert regression_version.metrics["mae"] == report["mae"]
    assert np.isfinite(regression_version.metrics["p50_batch1_us"])
