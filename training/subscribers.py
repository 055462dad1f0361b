"""What training does when the product announces something (:mod:`core.events`).

Registered in ``TrainingConfig.ready``; each handler runs after the commit of the write
that announced the event, on its own (a failure is logged and hides nothing else).
"""

from __future__ import annotations

from django.conf import settings

from core.events import Event
from training import notify
from training.services import job_retrain_for_flag
from training.services.drift_jobs import job_start_for_drift
from training.services.shipping import job_auto_ship


def round_opened(event: Event) -> None:
    """``federated_round.opened``: wake the devices long-polling ``GET rounds/?wait=``."""
    notify.rounds_changed(round_id=int(event.payload["round_id"]))


def model_flagged(event: Event) -> None:
    """``model.flagged``: with ``DRIFT_AUTO_RETRAIN``, start a short job from the version.

    In a transaction of its own, after the flag committed: a job that cannot start
    leaves the flag as it is (see :func:`training.services.job_retrain_for_flag`).
    """
    if getattr(settings, "DRIFT_AUTO_RETRAIN", False):
        job_retrain_for_flag(version_id=int(event.payload["version_id"]))


def model_flagged_start_job(event: Event) -> None:
    """``model.flagged``: when the family's policy says so, a job on the boards where it drifted
    (rate-limited per family; see :mod:`training.services.drift_jobs`)."""
    job_start_for_drift(version_id=int(event.payload["version_id"]), flag=dict(event.payload))


def job_succeeded_ship(event: Event) -> None:
    """``federated_job.status``: a succeeded job that drift started is shipped when its
    family's policy has ``auto_ship`` (see :func:`training.services.shipping.job_auto_ship`;
    the sweep ships one whose event was lost)."""
    if event.payload.get("status") == "succeeded":
        job_auto_ship(job_id=int(event.payload["job"]))
