"""Evaluating a registered version on its family's test set, and reading what that needs.

The one evaluation path of the product: the registry's evaluate and optimise jobs use
it, and so does federated training for the version each round produces. It runs the
version's ONNX model in ONNX Runtime (:func:`models_registry.ml.evaluate.evaluate_onnx`
for classification, ``evaluate_regression_onnx`` for regression), stores the full
report as an :class:`~models_registry.models.EvaluationReport` and merges the headline
numbers into ``ModelVersion.metrics``, so every version, however it was made, is
measured the same way and compared on the same data. A family without a test set is
evaluated federatedly instead, on the boards' holdouts (see ``training``).

A version that has weights and a program but no ONNX graph of its own is run as the
graph of its nearest ancestor with its weights written in by name
(:func:`graph_from_ancestor`, checked against the program on sample inputs), which is
also what the export job attaches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from core.api import ServiceError
from models_registry import datasets, selectors
from models_registry.models import Artifact, EvaluationDataset, EvaluationReport, ModelFamily, ModelVersion

__all__ = [
    "DEFAULT_LATENCY_REPEATS",
    "Evaluation",
    "GraphFromAncestor",
    "artifact_bytes",
    "evaluation_dataset",
    "graph_from_ancestor",
    "jsonable",
    "no_test_set",
    "version_evaluate",
    "version_graph",
    "version_state",
]

DEFAULT_LATENCY_REPEATS = 200


@dataclass(frozen=True)
class Evaluation:
    """A stored report and the headline numbers merged into the version's metrics."""

    report: EvaluationReport
    headline: dict[str, Any]


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into plain JSON values."""

    def fallback(item: Any) -> Any:
        if isinstance(item, np.generic):
            return item.item()
        if isinstance(item, np.ndarray):
            return item.tolist()
        return str(item)

    return json.loads(json.dumps(value, default=fallback))


def artifact_bytes(artifact: Artifact) -> bytes:
    """The stored bytes of an artifact, checked against its digest (``artifact_corrupt``)."""
    with default_storage.open(artifact.file.name, "rb") as handle:
        data: bytes = handle.read()
    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise ServiceError(
            f"The stored {artifact.kind} artifact of version {artifact.version_id} "
            "does not match its digest.",
            code="artifact_corrupt",
        )
    return data


def version_state(version: ModelVersion) -> dict[str, npt.NDArray[Any]] | None:
    """The version's weights by name (dtypes as stored), or None without a weights artifact."""
    from devices_agent.codecs import WireError, decode_tensors

    artifact = selectors.artifact_for_version(version.pk, Artifact.Kind.WEIGHTS)
    if artifact is None:
        return None
    try:
        tensors, _ = decode_tensors(artifact_bytes(artifact))
    except WireError as exc:
        raise ServiceError(f"The weights of {version.label} are unreadable: {exc}") from None
    return {name: np.asarray(tensor) for name, tensor in tensors.items()}


def _program(version: ModelVersion) -> bytes | None:
    try:
        return selectors.version_program(version=version)
    except ValueError as exc:
        raise ServiceError(str(exc), code="artifact_corrupt") from None


@dataclass(frozen=True)
class GraphFromAncestor:
    """An ONNX graph made for a version from an ancestor's graph and the version's weights."""

    onnx: bytes
    ancestor: ModelVersion
    max_abs_diff: float
    atol: float
    rtol: float


def graph_from_ancestor(
    version: ModelVersion, *, atol: float = 1e-4, rtol: float = 1e-3
) -> GraphFromAncestor:
    """The nearest ancestor's ONNX graph with the version's weights written in by name, checked.

    The version needs weights and a program (``no_weights``, ``no_program``). The graph is
    that of the nearest ancestor whose ONNX holds every trainable parameter of the
    program as an initializer of the same name and shape (``no_graph`` when none does:
    a quantised ancestor's graph, for one, does not); every tensor of the weights the
    graph holds is replaced (``models_registry.ml.onnx_weights``). The result is checked
    against the program on sample inputs (``devices_agent.program.check_bundle``): a
    disagreement is a ``onnx_mismatch`` with ``max_abs_diff``, ``atol`` and ``rtol`` in
    its details and its message.
    """
    from devices_agent.program import ProgramError, check_bundle, inspect_program, onnx_initializer_shapes
    from models_registry.ml.onnx_weights import onnx_with_weights

    program = _program(version)
    if program is None:
        raise ServiceError(
            f"{version.label} has no program; without one its weights cannot be written into a graph.",
            code="no_program",
        )
    state = version_state(version)
    if state is None:
        raise ServiceError(f"{version.label} has no weights artifact.", code="no_weights")
    trainable = inspect_program(program).parameters
    for ancestor in selectors.version_lineage(version):
        artifact = selectors.artifact_for_version(ancestor.pk, Artifact.Kind.ONNX)
        if artifact is None:
            continue
        graph = artifact_bytes(artifact)
        try:
            initializers = onnx_initializer_shapes(graph)
        except ProgramError:
            continue
        if all(initializers.get(name) == shape for name, shape in trainable.items()):
            break
    else:
        raise ServiceError(
            f"No ancestor of {version.label} has an ONNX graph holding its program's parameters by name "
            "to write its weights into; upload the ONNX with the version "
            "(devices_agent.program.make_bundle writes program, weights and ONNX together).",
            code="no_graph",
        )
    fitting = {
        name: value for name, value in state.items() if initializers.get(name) == tuple(np.shape(value))
    }
    onnx = onnx_with_weights(graph, fitting)
    spec = version.family.spec
    try:
        diff, outputs = check_bundle(
            program=program,
            state=state,
            onnx=onnx,
            input_shape=list(spec.input_shape),
            input_dtype=spec.input_dtype,
            atol=atol,
            rtol=rtol,
        )
    except ProgramError as exc:
        raise ServiceError(
            f"The graph of {ancestor.label} with the weights of {version.label} does not match its program: "
            f"{exc.message}",
            code=exc.code,
            details={"ancestor": ancestor.pk, "atol": atol, "rtol": rtol, **exc.details},
        ) from None
    if outputs != spec.outputs:
        raise ServiceError(
            f"The model returns {outputs} values per example; "
            f"family {version.family.name} needs {spec.outputs}.",
            code="shape_mismatch",
        )
    return GraphFromAncestor(onnx=onnx, ancestor=ancestor, max_abs_diff=diff, atol=atol, rtol=rtol)


def version_graph(version: ModelVersion) -> bytes:
    """The ONNX graph the version runs: its own, else :func:`graph_from_ancestor` (``no_artifacts``)."""
    artifact = selectors.artifact_for_version(version.pk, Artifact.Kind.ONNX)
    if artifact is not None:
        return artifact_bytes(artifact)
    if _program(version) is None:
        raise ServiceError(
            f"{version.label} has no ONNX model to evaluate, and no program to write its weights into "
            "an ancestor's graph; upload its ONNX.",
            code="no_artifacts",
        )
    return graph_from_ancestor(version).onnx


def no_test_set(family: ModelFamily) -> ServiceError:
    """The refusal for a family without a test set: its versions are evaluated on the boards."""
    return ServiceError(
        f"Family {family.name} has no test set, so its versions are evaluated on the boards' own holdouts "
        "(federated evaluation, by each training round). To evaluate on the server, register a data set "
        "with split=test (POST /api/v1/datasets/).",
        code="no_dataset",
        details={"family": family.pk, "evaluation": "federated"},
    )


def evaluation_dataset(*, family: ModelFamily, name: str | None = None) -> EvaluationDataset | None:
    """The family's central test set: the one named ``name``, else its newest; None without one.

    A family without a test set is evaluated where its data is, on the boards' holdouts
    (federated evaluation, see ``training``). Raises ``ServiceError`` when ``name`` is
    not registered (``no_dataset``), is not a test set (``wrong_split``), or does not fit
    the family (``dataset_mismatch``).
    """
    return datasets.family_dataset(family=family, split=EvaluationDataset.Split.TEST, name=name)


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
    ``onnx_bytes`` is the model to run when the caller has it already (a graph not
    attached to the version yet); otherwise :func:`version_graph`. The report
    keeps the whole output of ``evaluate_onnx`` (confusion matrix, per-class precision
    and recall, ROC, latency, size); the headline keys are merged into
    ``version.metrics`` (other keys, such as ``rejected`` or ``flagged``, stay).
    """
    from models_registry.ml.evaluate import evaluate_onnx, evaluate_regression_onnx

    dataset = dataset or evaluation_dataset(family=version.family)
    if dataset is None:
        raise no_test_set(version.family)
    model = onnx_bytes if onnx_bytes is not None else version_graph(version)
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
    headline = jsonable(_headline(report, dataset))
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=version.pk)
        saved = EvaluationReport.objects.create(version=locked, dataset=dataset.name, report=jsonable(report))
        # Merged, not replaced: keys such as "rejected" or "flagged" stay.
        locked.metrics = {**(locked.metrics or {}), **headline}
        locked.save(update_fields=["metrics"])
    version.metrics = locked.metrics
    return Evaluation(report=saved, headline=headline)
