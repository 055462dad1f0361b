"""Page data for federated training: jobs, rounds, participants and dropped devices."""

from __future__ import annotations

import uuid
from typing import Any

from fleet.models import Device
from frontend.charts import line_spec
from training.models import ClientUpdate, FederatedJob, FederatedRound
from training.selectors import job_list, job_rounds


def jobs(*, limit: int = 100) -> list[FederatedJob]:
    return list(job_list().order_by("-id")[:limit])


def job_detail(*, job_id: int) -> FederatedJob | None:
    return job_list().filter(pk=job_id).first()


def round_charts(*, rounds: list[FederatedRound]) -> list[dict[str, Any]]:
    """Accuracy and loss per round on one chart, bytes per round on another."""
    if not rounds:
        return []
    labels = [str(r.number) for r in rounds]
    quality = line_spec(
        labels=labels,
        series=[
            {"label": "accuracy", "data": [r.accuracy for r in rounds], "axis": "y"},
            {"label": "loss", "data": [r.loss for r in rounds], "axis": "y2"},
        ],
        x_label="round",
        y_label="accuracy",
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
    return [
        {"title": "Accuracy and loss per round", "spec": quality},
        {"title": "Bytes per round", "spec": traffic},
    ]


def _is_uuid(value: Any) -> bool:
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def round_participants(*, rnd: FederatedRound | None) -> dict[str, Any]:
    """The updates received in a round and the selected devices that sent none (two queries)."""
    if rnd is None:
        return {"round": None, "updates": [], "dropped": []}
    updates = list(ClientUpdate.objects.filter(round=rnd).select_related("device").order_by("id"))
    sent = {str(u.device_id) for u in updates}
    missing = [d for d in (rnd.selected or []) if str(d) not in sent and _is_uuid(d)]
    dropped = list(Device.objects.filter(pk__in=missing).only("id", "name", "status")) if missing else []
    return {"round": rnd, "updates": updates, "dropped": dropped}


def job_page(*, job: FederatedJob) -> dict[str, Any]:
    rounds = list(job_rounds(job_id=job.pk))
    latest = rounds[-1] if rounds else None
    return {
        "rounds": rounds,
        "charts": round_charts(rounds=rounds),
        "participants": round_participants(rnd=latest),
    }
