"""Page data for the model registry pages."""

from __future__ import annotations

from typing import Any

from django.db.models import Count, QuerySet

from frontend.charts import heat_cells, roc_spec
from models_registry.models import EvaluationReport, ModelFamily, ModelVersion
from models_registry.selectors import family_list, version_list


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


def variant_rows(
    *, versions: list[ModelVersion], reports: dict[int, EvaluationReport]
) -> list[dict[str, Any]]:
    """One row per version for the comparison table: accuracy, loss, AUC, latency, size."""
    rows = []
    for v in versions:
        body = reports[v.pk].report if v.pk in reports else {}
        headline = {**(v.metrics or {}), **body}
        latency = (headline.get("latency_us") or {}).get("batch_1") or {}
        rows.append(
            {
                "version": v,
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


def report_view(report: EvaluationReport | None) -> dict[str, Any] | None:
    """What the version page draws from an evaluation report (see models_registry.ml.evaluate)."""
    if report is None:
        return None
    body = report.report or {}
    matrix = body.get("confusion_matrix") or []
    latency = body.get("latency_us") or {}
    return {
        "report": report,
        "body": body,
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
