"""Celery tasks: provisioning. Thin: the service does the work and says when to come back."""

from __future__ import annotations

from celery import shared_task

from core.dispatch import send_now
from fleet.services.provisioning import provisioning_job_run, provisioning_jobs_resume, task_time_limit_s

__all__ = ["provision_device", "provisioning_resume"]


@shared_task(
    name="fleet.provision_device",
    ignore_result=True,
    soft_time_limit=task_time_limit_s(),
    time_limit=task_time_limit_s() + 60,
)
def provision_device(job_id: int) -> None:
    """Advance provisioning job `job_id`; re-schedules itself instead of sleeping while it waits."""
    delay = provisioning_job_run(job_id=job_id)
    if delay is not None:
        send_now("fleet.provision_device", job_id, countdown=delay)


@shared_task(name="fleet.provisioning_resume", ignore_result=True)
def provisioning_resume() -> int:
    """Periodic (beat): re-enqueue jobs whose next run was lost and poll waiting ones."""
    ids = provisioning_jobs_resume()
    for job_id in ids:
        send_now("fleet.provision_device", job_id)
    return len(ids)
