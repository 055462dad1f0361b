"""Page data for federated training: jobs, rounds, participants and dropped devices."""

from __future__ import annotations

import uuid
from typing import Any

from devices_agent.wire import TRAINING_BACKENDS
from fleet.models import Device
from frontend.charts import line_spec
from training.models import ClientUpdate, FederatedJob, FederatedRound
from training.selectors import job_list, job_rounds


def jobs(*, limit: int = 100) -> list[FederatedJob]:
    return list(job_list().order_by("-id")[:limit])


def job_detail(*, job_id: int) -> FederatedJob | None:
    return job_list().filter(pk=job_id).first()


def job_metric(job: FederatedJob) -> str:
    """The job's family's primary metric: ``accuracy`` or ``mae``."""
    return "mae" if job.family.task == "regression" else "accuracy"


def job_best(job: FederatedJob) -> float | None:
    """The best version's primary metric (rows from before ``best_metric`` have accuracy only)."""
    if job.best_metric is not None:
        return job.best_metric
    return job.best_accuracy if job_metric(job) == "accuracy" else None


def round_metric(rnd: FederatedRound, metric: str) -> float | None:
    """A round's version judged by the primary metric (rows from before ``metric``: accuracy)."""
    if rnd.metric is not None:
        return rnd.metric
    return rnd.accuracy if metric == "accuracy" else None


def round_rows(*, rounds: list[FederatedRound], metric: str) -> list[dict[str, Any]]:
    """Each round with its primary metric, how it was measured and the spread across boards."""
    rows = []
    for r in rounds:
        detail = r.evaluation_detail if isinstance(r.evaluation_detail, dict) else {}
        rows.append(
            {
                "round": r,
                "metric": round_metric(r, metric),
                "evaluation": r.evaluation or ("central" if r.accuracy is not None else ""),
                "detail": detail or None,
                "is_evaluation": r.kind == FederatedRound.Kind.EVALUATE,
            }
        )
    return rows


def round_charts(*, rounds: list[FederatedRound], metric: str = "accuracy") -> list[dict[str, Any]]:
    """The primary metric (accuracy or mae) and loss per round on one chart, bytes on another.

    Evaluation rounds train nothing: they appear on the metric chart (their number is the
    final version's, measured on the boards), not in the loss series.
    """
    if not rounds:
        return []
    labels = [str(r.number) if r.kind == FederatedRound.Kind.TRAIN else f"{r.number} (eval)" for r in rounds]
    quality = line_spec(
        labels=labels,
        series=[
            {"label": metric, "data": [round_metric(r, metric) for r in rounds], "axis": "y"},
            {"label": "loss", "data": [r.loss for r in rounds], "axis": "y2"},
        ],
        x_label="round",
        y_label=metric,
        y2_label="loss",
    )
    traffic = line_spec(
        labels=labels,
        series=[
            {"label": "uploaded KiB", "data": [round(r.bytes_in / 1024, 1) for r in rounds]},
            {"label": "downloaded KiB", "data": [round(r.bytes_out / 1024, 1) for r in rounds]},
        ],
        x_label="round",
        y_label="KiB",
    )
    traffic["kind"] = "bar"
    title = "Accuracy" if metric == "accuracy" else "Mean absolute error"
    return [
        {"title": f"{title} and loss per round", "spec": quality},
        {"title": "Bytes per round", "spec": traffic},
    ]


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def update_row(update: ClientUpdate, metric: str) -> dict[str, Any]:
    """An update with the backend that trained it and the global model's holdout numbers."""
    numbers = update.metrics if isinstance(update.metrics, dict) else {}
    backends = [b for b in TRAINING_BACKENDS if float(numbers.get(f"backend_{b}") or 0.0) >= 1.0]
    return {
        "update": update,
        "backend": ", ".join(backends),
        "holdout": numbers.get(f"holdout_{metric}"),
        "holdout_examples": numbers.get("holdout_examples"),
    }


def round_participants(*, rnd: FederatedRound | None, metric: str = "accuracy") -> dict[str, Any]:
    """The updates received in a round and the selected devices that sent none (two queries)."""
    if rnd is None:
        return {"round": None, "updates": [], "dropped": []}
    updates = list(ClientUpdate.objects.filter(round=rnd).select_related("device").order_by("id"))
    sent = {str(u.device_id) for u in updates}
    missing = [d for d in (rnd.selected or []) if str(d) not in sent and _is_uuid(d)]
    dropped = list(Device.objects.filter(pk__in=missing).only("id", "name", "status")) if missing else []
    return {"round": rnd, "updates": [update_row(u, metric) for u in updates], "dropped": dropped}


def job_page(*, job: FederatedJob) -> dict[str, Any]:
    metric = job_metric(job)
    rounds = list(job_rounds(job_id=job.pk).select_related("base_version__family"))
    latest = rounds[-1] if rounds else None
    return {
        "metric": metric,
        "best": job_best(job),
        "rounds": round_rows(rounds=rounds, metric=metric),
        "evaluation_rounds": sum(1 for r in rounds if r.kind == FederatedRound.Kind.EVALUATE),
        "charts": round_charts(rounds=rounds, metric=metric),
        "participants": round_participants(rnd=latest, metric=metric),
    }


def job_rows(jobs: list[FederatedJob]) -> list[dict[str, Any]]:
    """Jobs with their family's primary metric and the best value of it."""
    return [{"job": j, "metric": job_metric(j), "best": job_best(j)} for j in jobs]
