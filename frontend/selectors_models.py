"""Page data for the model registry pages."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, QuerySet

from devices_agent.family import SpecError
from frontend.charts import heat_cells, roc_spec
from models_registry.models import Artifact, EvaluationReport, ModelFamily, ModelVersion
from models_registry.selectors import family_list, version_list

# What each artifact is for, as the version page says it.
ARTIFACT_ROLES: dict[str, str] = {
    Artifact.Kind.ONNX: "served on boards",
    Artifact.Kind.WEIGHTS: "by parameter name",
    Artifact.Kind.PROGRAM: "trained on boards",
}


def family_metric(family: ModelFamily) -> str:
    """The family's primary metric: ``accuracy`` (classification) or ``mae`` (regression)."""
    return "mae" if family.task == ModelFamily.Task.REGRESSION else "accuracy"


def family_contract(family: ModelFamily) -> dict[str, Any]:
    """The family's task and input contract as the family page states it."""
    regression = family.task == ModelFamily.Task.REGRESSION
    outputs = family.output_size if regression else family.num_classes
    try:
        valid = family.spec is not None  # checked as boards read it
    except SpecError:
        valid = False
    return {
        "task": family.task,
        "input_shape": list(family.input_shape or []),
        "input_dtype": family.input_dtype or "float32",
        "outputs": outputs,
        "outputs_label": "outputs" if regression else "classes",
        "outputs_text": (
            f"{outputs} output{'' if outputs == 1 else 's'}" if regression else f"{outputs} classes"
        )
        if outputs
        else "",
        "metric": family_metric(family),
        "better": "lower" if regression else "higher",
        "feedback": "abs_error" if regression else "correct",
        "loss": "mean squared error" if regression else "cross-entropy",
        "valid": valid,
    }


def families() -> QuerySet[ModelFamily]:
    """Families with their version count and the newest version number (one query)."""
    from django.db.models import Max

    return family_list().annotate(version_count=Count("versions"), latest=Max("versions__number"))


def family_versions(*, family: ModelFamily) -> list[ModelVersion]:
    """The family's versions, newest first, with parent and artifacts (two queries)."""
    return list(version_list({"family": family.pk}).order_by("-number"))


def latest_reports(*, versions: list[ModelVersion]) -> dict[int, EvaluationReport]:
    """The newest evaluation of each version, in one query."""
    reports: dict[int, EvaluationReport] = {}
    ids = [v.pk for v in versions]
    for report in EvaluationReport.objects.filter(version_id__in=ids).order_by(
        "version_id", "-created_at", "-id"
    ):
        reports.setdefault(report.version_id, report)
    return reports


def evaluation_of(version: ModelVersion) -> dict[str, Any]:
    """How a version was judged: ``central`` (a test set) or ``federated`` (the boards'
    holdouts, with the spread across boards), or nothing yet."""
    metrics = version.metrics or {}
    kind = metrics.get("evaluation") or ""
    detail = metrics.get("federated_evaluation") if kind == "federated" else None
    return {"kind": kind, "detail": detail if isinstance(detail, dict) else None}


def variant_rows(
    *, versions: list[ModelVersion], reports: dict[int, EvaluationReport]
) -> list[dict[str, Any]]:
    """One row per version for the comparison table: the family's primary metric and how it
    was measured, loss, AUC (classification) or RMSE (regression), latency, size."""
    rows = []
    for v in versions:
        body = reports[v.pk].report if v.pk in reports else {}
        headline = {**(v.metrics or {}), **body}
        latency = (headline.get("latency_us") or {}).get("batch_1") or {}
        metric = family_metric(v.family)
        evaluation = evaluation_of(v)
        if not evaluation["kind"] and body:
            evaluation["kind"] = "central"
        rows.append(
            {
                "version": v,
                "metric": metric,
                "primary": headline.get(metric),
                "evaluation": evaluation,
                "rmse": headline.get("rmse"),
                "accuracy": headline.get("accuracy"),
                "loss": headline.get("loss"),
                "macro_auc": headline.get("macro_auc"),
                "latency_p50_ms": latency["p50_us"] / 1000 if "p50_us" in latency else None,
                "latency_p95_ms": latency["p95_us"] / 1000 if "p95_us" in latency else None,
                "size_bytes": headline.get("size_bytes"),
                "parameters": headline.get("parameter_count"),
            }
        )
    return rows


def _at(values: Any, index: int) -> Any:
    return values[index] if isinstance(values, list) and index < len(values) else None


def version_artifacts(version: ModelVersion) -> list[dict[str, Any]]:
    """The version's artifacts in a fixed order (ONNX, weights, program) with what each is for."""
    order: dict[str, int] = {Artifact.Kind.ONNX: 0, Artifact.Kind.WEIGHTS: 1, Artifact.Kind.PROGRAM: 2}
    artifacts = sorted(version.artifacts.all(), key=lambda a: (order.get(a.kind, 9), a.kind))
    return [{"artifact": a, "role": ARTIFACT_ROLES.get(a.kind, a.kind)} for a in artifacts]


def version_learning(version: ModelVersion) -> dict[str, Any]:
    """What boards can do with a version: serve it (ONNX), train and personalise it (all three)."""
    kinds = {a.kind for a in version.artifacts.all()}
    return {
        "servable": Artifact.Kind.ONNX in kinds,
        "trainable": {Artifact.Kind.ONNX, Artifact.Kind.WEIGHTS, Artifact.Kind.PROGRAM} <= kinds,
        "head": list(version.head or []),
    }


def report_view(report: EvaluationReport | None) -> dict[str, Any] | None:
    """What the version page draws from an evaluation report (see models_registry.ml.evaluate).

    A classification report has accuracy, a confusion matrix, ROC curves and per-class
    numbers; a regression report has mae, rmse and per-output mae and R².
    """
    if report is None:
        return None
    body = report.report or {}
    matrix = body.get("confusion_matrix") or []
    latency = body.get("latency_us") or {}
    r2 = body.get("r2") if isinstance(body.get("r2"), list) else []
    return {
        "report": report,
        "body": body,
        "regression": "mae" in body and "accuracy" not in body,
        "per_output": [
            {"output": i, "mae": value, "r2": _at(r2, i)}
            for i, value in enumerate(body.get("mae_per_output") or [])
        ],
        "heat": heat_cells(matrix) if matrix else [],
        "classes": list(range(len(matrix))),
        "roc": roc_spec(curves=body.get("roc") or [], auc=body.get("auc") or []) if body.get("roc") else None,
        "per_class": [
            {
                "cls": i,
                "precision": _at(body.get("precision"), i),
                "recall": _at(body.get("recall"), i),
                "auc": _at(body.get("auc"), i),
            }
            for i in range(len(matrix))
        ],
        "latency": [
            {
                "batch": key.removeprefix("batch_"),
                "p50_ms": v.get("p50_us", 0) / 1000,
                "p95_ms": v.get("p95_us", 0) / 1000,
            }
            for key, v in sorted(latency.items())
            if isinstance(v, dict)
        ],
    }


def version_shadows(version: ModelVersion, *, limit: int = 5) -> list[dict[str, Any]]:
    """The version's latest shadow deployments, each with its per-device report."""
    from fleet.selectors.shadows import shadow_list, shadow_report

    return [
        {"shadow": shadow, "report": shadow_report(shadow=shadow)}
        for shadow in shadow_list().filter(version=version)[:limit]
    ]
