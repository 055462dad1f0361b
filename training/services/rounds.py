"""Rounds: opening (selection, the round's global weights), closing, and the periodic tick
that recovers the opening and closing of rounds whose message was lost (aggregations lost
are re-driven by the sweep, :func:`rounds_redrive`).

Round lifecycle: ``pending`` (waiting for enough eligible devices) -> ``collecting``
(devices fetch the task and upload deltas) -> ``aggregating`` (closed: every selected
device answered, or the deadline passed with at least ``quorum`` accepted updates) ->
``evaluating`` -> ``done`` (a new ModelVersion), or ``failed`` (too few updates at the
deadline, or aggregation failed). After ``max_consecutive_failures`` failed rounds in a
row the job fails; otherwise the next round opens.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from core.dispatch import enqueue_on_commit, send_now
from core.events import emit
from models_registry.models import Artifact, ModelVersion
from training import selectors, storage
from training.models import ClientUpdate, FederatedJob, FederatedRound
from training.services.aggregation import AGGREGATION_LEASE
from training.services.jobs import job_round_failed, job_succeed

ACTIVE = (
    FederatedRound.Status.COLLECTING,
    FederatedRound.Status.AGGREGATING,
    FederatedRound.Status.EVALUATING,
)
BUSY = (FederatedRound.Status.AGGREGATING, FederatedRound.Status.EVALUATING)


def _weights_of(version: ModelVersion) -> bytes:
    artifact = Artifact.objects.get(version=version, kind=Artifact.Kind.WEIGHTS)
    with artifact.file.open("rb") as handle:
        data: bytes = handle.read()
    return data


def _needs_final_evaluation(*, job: FederatedJob, last: FederatedRound | None) -> bool:
    """After the last training round: whether the boards must still judge the final version.

    A version is judged by the next round's boards on their holdouts when the family has
    no test set; the last version has no next round, so it gets an evaluation round.
    """
    if last is None or last.kind != FederatedRound.Kind.TRAIN or last.status != FederatedRound.Status.DONE:
        return False
    return last.evaluation != "central" and last.version_id is not None


def _next_round(*, job: FederatedJob, last: FederatedRound | None) -> FederatedRound | None:
    """Create the round after ``last`` with its global weights; None when the job is done."""
    number = (last.number + 1) if last is not None else 1
    kind = FederatedRound.Kind.TRAIN
    if number > job.rounds:
        if not _needs_final_evaluation(job=job, last=last):
            return None
        kind = FederatedRound.Kind.EVALUATE
    base = job.base_version
    if last is not None:
        latest = (
            FederatedRound.objects.filter(job=job)
            .filter(Q(status=FederatedRound.Status.DONE) | _evaluating_behind(job))
            .order_by("-number")
            .select_related("version")
            .first()
        )
        if latest is not None and latest.version is not None:
            base = latest.version
    rnd = FederatedRound.objects.create(job=job, number=number, base_version=base, kind=kind)
    data = _weights_of(base)
    rnd.weights_path = storage.save_bytes(
        name=f"{storage.round_dir(job_id=job.pk, round_number=number)}/global.safetensors", data=data
    )
    rnd.weights_sha256 = storage.sha256_hex(data)
    rnd.weights_size = len(data)
    rnd.save(update_fields=["weights_path", "weights_sha256", "weights_size"])
    FederatedJob.objects.filter(id=job.pk).update(current_round=number)
    return rnd


def _evaluating_behind(job: FederatedJob) -> Q:
    """A training round before the job's last whose version is registered and being
    evaluated: the next round may open from that version while the evaluation runs (the
    boards train meanwhile; the evaluation only scores the version)."""
    return Q(
        status=FederatedRound.Status.EVALUATING,
        kind=FederatedRound.Kind.TRAIN,
        version__isnull=False,
        number__lt=job.rounds,
    )


@transaction.atomic
def round_open(*, job_id: int) -> FederatedRound | None:
    """Open the job's next round (or finish the job after its last round).

    Safe to call repeatedly: a round already collecting is left alone, a pending round
    (too few eligible devices last time) retries its selection. Announces
    ``federated_round.opened`` with the chosen devices: their agents are nudged and
    devices long-polling ``GET rounds/?wait=`` wake up.
    """
    job = FederatedJob.objects.select_for_update().filter(id=job_id).first()
    if job is None or job.status != FederatedJob.Status.RUNNING:
        return None
    busy = FederatedRound.objects.filter(job=job, status__in=ACTIVE).exclude(_evaluating_behind(job)).first()
    if busy is not None:
        return busy
    last = FederatedRound.objects.filter(job=job).order_by("-number").first()
    if last is not None and last.status == FederatedRound.Status.PENDING:
        rnd = last
    else:
        created = _next_round(job=job, last=last)
        if created is None:
            job_succeed(job=job)
            return None
        rnd = created

    chosen, funnel = selectors.round_selection(
        job=job, number=rnd.number, evaluate=rnd.kind == rnd.Kind.EVALUATE, version=rnd.base_version
    )
    if not chosen:
        reason = f"waiting for devices: {funnel['eligible']} eligible, need {max(1, job.min_clients)}"
        left_out = ", ".join(
            f"{n} {why}" for why, n in funnel.items() if why in selectors.FUNNEL_REASONS and n
        )
        if left_out:
            reason += f" ({left_out})"
        if rnd.failure_reason != reason or rnd.funnel != funnel:
            rnd.failure_reason = reason
            rnd.funnel = funnel
            rnd.save(update_fields=["failure_reason", "funnel"])
        return rnd
    now = timezone.now()
    rnd.selected = chosen
    rnd.status = FederatedRound.Status.COLLECTING
    rnd.opened_at = now
    rnd.deadline = now + timedelta(seconds=job.round_deadline_s)
    rnd.failure_reason = ""
    rnd.eligible = funnel["eligible"]
    rnd.funnel = funnel
    rnd.selected_examples = selectors.reported_examples(device_ids=chosen)
    rnd.save()
    emit("federated_round.status", {"job": job.pk, "round": rnd.number, "status": rnd.status})
    emit(
        "federated_round.opened",
        {"job": job.pk, "round": rnd.number, "round_id": rnd.pk, "devices": chosen},
    )
    return rnd


def _due(rnd: FederatedRound, *, now: datetime) -> bool:
    """Whether a collecting round should close: the deadline passed, or every selected
    device answered."""
    if rnd.deadline is not None and now >= rnd.deadline:
        return True
    return selectors.round_answered(rnd=rnd) >= len(rnd.selected)


@transaction.atomic
def round_close(*, round_id: int) -> FederatedRound | None:
    """Close a collecting round: aggregate it when it has quorum, otherwise fail it.

    Called when every selected device answered and by the periodic tick; before the
    deadline a round with missing devices stays open.
    """
    rnd = FederatedRound.objects.select_related("job").filter(id=round_id).first()
    if rnd is None or rnd.status != FederatedRound.Status.COLLECTING:
        return rnd
    job = rnd.job
    now = timezone.now()
    updates = ClientUpdate.objects.filter(round=rnd, device_id__in=rnd.selected)
    accepted = updates.filter(status=ClientUpdate.Status.ACCEPTED).count()
    answered = updates.count()
    complete = answered >= len(rnd.selected)
    past_deadline = rnd.deadline is not None and now >= rnd.deadline
    if not complete and not past_deadline:
        return rnd
    dropped = len(rnd.selected) - answered
    collect_s = (now - rnd.opened_at).total_seconds() if rnd.opened_at else None
    closing = FederatedRound.objects.filter(id=rnd.pk, status=FederatedRound.Status.COLLECTING)
    if accepted >= min(job.quorum, len(rnd.selected)) and accepted > 0:
        changed = closing.update(
            status=FederatedRound.Status.AGGREGATING,
            closed_at=now,
            dropped=dropped,
            participants=accepted,
            collect_s=collect_s,
            lease_expires_at=None,
        )
        if changed:
            enqueue_on_commit("training.round_aggregate", rnd.pk)
            emit(
                "federated_round.status",
                {"job": job.pk, "round": rnd.number, "status": FederatedRound.Status.AGGREGATING},
            )
    else:
        reason = f"{accepted} accepted update(s) at the deadline; quorum is {job.quorum}"
        changed = closing.update(
            status=FederatedRound.Status.FAILED,
            closed_at=now,
            finished_at=now,
            dropped=dropped,
            participants=accepted,
            collect_s=collect_s,
            failure_reason=reason,
        )
        if changed:
            job_round_failed(job=job, rnd=rnd, reason=reason)
    rnd.refresh_from_db()
    return rnd


def round_weights_served(*, round_id: int, nbytes: int) -> None:
    """Count bytes of global weights sent to devices."""
    FederatedRound.objects.filter(id=round_id).update(bytes_out=F("bytes_out") + nbytes)


def rounds_tick() -> dict[str, int]:
    """Periodic (``training.rounds_tick``): finds the work every training task was sent for.

    ``round_open`` and ``round_close`` are recovered here when their message is lost (see
    ``TrainingConfig.ready``); ``round_aggregate`` by the sweep (:func:`rounds_redrive`):

    - ``round_close``: a collecting round whose selected devices all answered, or whose
      deadline passed, is closed now;
    - ``round_open``: a running job without a collecting, aggregating or evaluating round
      gets its next round, and a pending round retries its selection.

    A message that was only slow makes the task run twice, which the tasks allow.
    """
    now = timezone.now()
    counts = {"closed": 0, "reopened": 0}
    for rnd in FederatedRound.objects.filter(status=FederatedRound.Status.COLLECTING).only(
        "id", "selected", "deadline"
    ):
        if _due(rnd, now=now):
            closed = round_close(round_id=rnd.pk)
            if closed is not None and closed.status != FederatedRound.Status.COLLECTING:
                counts["closed"] += 1
    running = FederatedJob.objects.filter(status=FederatedJob.Status.RUNNING).values_list("id", flat=True)
    for job_id in running:
        if not FederatedRound.objects.filter(job_id=job_id, status__in=ACTIVE).exists():
            round_open(job_id=job_id)
            counts["reopened"] += 1
    return counts


def rounds_redrive(*, now: datetime, grace: timedelta) -> list[int]:
    """The sweep's re-drive of rounds (``core.sweep``): send ``round_aggregate`` again for
    every round ``aggregating`` or ``evaluating`` that no live lease holds.

    That is a round whose lease expired (its worker died; a redelivery did not take it
    over) and a round nobody claimed within ``grace`` of closing (its message was lost).
    A round under a live lease is never re-sent, and a round is re-sent at most once per
    ``grace`` (``redriven_at``). A duplicate message is harmless: the
    lease lets one worker through and the checkpoints keep every update counted once.
    Returns the ids of the rounds it sent (a refused send is retried by the next sweep).
    """
    unclaimed = Q(lease_expires_at__isnull=True) & (Q(closed_at__lt=now - grace) | Q(closed_at__isnull=True))
    # A round waiting behind a busy worker is sent again at most once per grace, not at
    # every sweep: the duplicates would only queue up behind it.
    not_lately = Q(redriven_at__isnull=True) | Q(redriven_at__lt=now - grace)
    due = FederatedRound.objects.filter(
        Q(status__in=BUSY) & (AGGREGATION_LEASE.expired(now) | unclaimed) & not_lately
    )
    sent = [
        rid
        for rid in due.order_by("id").values_list("id", flat=True)
        if send_now("training.round_aggregate", rid)
    ]
    FederatedRound.objects.filter(id__in=sent).update(redriven_at=now)
    return sent
