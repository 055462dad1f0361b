"""Evaluating a registered version on a registered test set.

The one evaluation path of the product: the registry's evaluate and optimise jobs use
it, and so does federated training for the version each round produces. It runs the
version's ONNX model in ONNX Runtime (:func:`models_registry.ml.evaluate.evaluate_onnx`),
stores the full report as an :class:`~models_registry.models.EvaluationReport` and merges
the headline numbers into ``ModelVersion.metrics``, so every version, however it was
made, is measured the same way and compared on the same data. A family without a test
set is evaluated federatedly instead, on the boards' holdouts (see ``training``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from core.api import ServiceError
from models_registry import datasets, selectors
from models_registry.models import Artifact, EvaluationDataset, EvaluationReport, ModelFamily, ModelVersion

__all__ = [
    "DEFAULT_LATENCY_REPEATS",
    "Evaluation",
    "evaluation_dataset",
    "version_evaluate",
]

DEFAULT_LATENCY_REPEATS = 200


@dataclass(frozen=True)
class Evaluation:
    """A stored report and the headline numbers merged into the version's metrics."""

    report: EvaluationReport
    headline: dict[str, Any]


def _jsonable(value: Any) -> Any:
    def fallback(item: Any) -> Any:
        if isinstance(item, np.generic):
            return item.item()
        if isinstance(item, np.ndarray):
            return item.tolist()
        return str(item)

    return json.loads(json.dumps(value, default=fallback))


def evaluation_dataset(*, family: ModelFamily, name: str | None = None) -> EvaluationDataset | None:
    """The family's central test set: the one named ``name``, else its newest; None without one.

    A family without a test set is evaluated where its data is, on the boards' holdouts
    (federated evaluation, see ``training``). Raises ``ServiceError`` when ``name`` is
    not registered (``no_dataset``), is not a test set, or does not fit the family
    (``dataset_mismatch``).
    """
    if name is None:
        return (
            EvaluationDataset.objects.filter(family=family, split=EvaluationDataset.Split.TEST)
            .order_by("-created_at", "-id")
            .first()
        )
    dataset = datasets.dataset_get(name)
    if dataset is None:
        raise ServiceError(f"No data set named {name!r} is registered.", code="no_dataset")
    if dataset.split != EvaluationDataset.Split.TEST:
        raise ServiceError(f"Data set {dataset.name} is a {dataset.split} set; evaluation needs a test set.")
    spec = family.spec
    if list(dataset.input_shape) != list(spec.input_shape) or (
        spec.task == "classification" and dataset.num_classes != spec.num_classes
    ):
        raise ServiceError(
            f"Data set {dataset.name} has examples of shape {dataset.input_shape} and "
            f"{dataset.num_classes} classes; family {family.name} expects shape {family.input_shape}"
            + (f" and {spec.num_classes} classes." if spec.task == "classification" else "."),
            code="dataset_mismatch",
        )
    return dataset


def _onnx_artifact_bytes(version: ModelVersion) -> bytes:
    artifact = selectors.artifact_for_version(version.pk, Artifact.Kind.ONNX)
    if artifact is None:
        raise ServiceError(
            f"{version.label} has no ONNX model to evaluate; export it first.", code="no_artifacts"
        )
    with default_storage.open(artifact.file.name, "rb") as handle:
        data: bytes = handle.read()
    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise ServiceError(f"Stored onnx artifact of {version.label} does not match its digest.")
    return data


def _headline(report: dict[str, Any], dataset: EvaluationDataset) -> dict[str, Any]:
    latency = report.get("latency_us", {})
    quality = {k: report[k] for k in ("accuracy", "macro_auc", "mae", "rmse") if k in report}
    return {
        **quality,
        "loss": report["loss"],
        "size_bytes": report["size_bytes"],
        "compressed_size_bytes": report["compressed_size_bytes"],
        "parameter_count": report["parameter_count"],
        "p50_batch1_us": latency.get("batch_1", {}).get("p50_us"),
        "p95_batch1_us": latency.get("batch_1", {}).get("p95_us"),
        "p50_batch64_us": latency.get("batch_64", {}).get("p50_us"),
        "dataset": dataset.name,
        "evaluated_at": timezone.now().isoformat(),
    }


def version_evaluate(
    *,
    version: ModelVersion,
    dataset: EvaluationDataset | None = None,
    latency_repeats: int = DEFAULT_LATENCY_REPEATS,
    onnx_bytes: bytes | None = None,
) -> Evaluation:
    """Evaluate ``version`` on ``dataset`` and record the report and headline metrics.

    ``dataset`` defaults to :func:`evaluation_dataset` of the version's family.
    ``onnx_bytes`` is the model to run when the caller has it already (an export not
    attached to the version); otherwise the version's ONNX artifact is read. The report
    keeps the whole output of ``evaluate_onnx`` (confusion matrix, per-class precision
    and recall, ROC, latency, size); the headline keys are merged into
    ``version.metrics`` (other keys, such as ``rejected`` or ``flagged``, stay).
    """
    from models_registry.ml.evaluate import evaluate_onnx, evaluate_regression_onnx

    dataset = dataset or evaluation_dataset(family=version.family)
    if dataset is None:
        raise ServiceError(
            f"Family {version.family.name} has no test set to evaluate on (see /api/v1/datasets/).",
            code="no_dataset",
        )
    model = onnx_bytes if onnx_bytes is not None else _onnx_artifact_bytes(version)
    x, y = datasets.dataset_load(dataset)
    spec = version.family.spec
    if spec.task == "regression":
        report = evaluate_regression_onnx(
            onnx_bytes=model, x=x, y=y, output_size=spec.outputs, latency_repeats=latency_repeats
        )
    else:
        report = evaluate_onnx(
            onnx_bytes=model, x=x, y=y, num_classes=spec.outputs, latency_repeats=latency_repeats
        )
    headline = _jsonable(_headline(report, dataset))
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        saved = EvaluationReport.objects.create(
            version=locked, dataset=dataset.name, report=_jsonable(report)
        )
        # Merged, not replaced: keys such as "rejected" or "flagged" stay.
        locked.metrics = {**(locked.metrics or {}), **headline}
        locked.save(update_fields=["metrics"])
    version.metrics = locked.metrics
    return Evaluation(report=saved, headline=headline)
