"""Celery tasks of the model registry. Thin: a job id in, ``job_run``, safe to run twice."""

from __future__ import annotations

from celery import shared_task

__all__ = ["build_ort_training", "evaluate_version", "export_version", "optimise_version"]


@shared_task(name="models_registry.evaluate_version", ignore_result=True)
def evaluate_version(job_id: int) -> str:
    """Evaluate a version on a registered data set (ModelJob ``job_id``, kind evaluate)."""
    from models_registry.jobs import job_run

    return job_run(job_id=job_id)


@shared_task(name="models_registry.export_version", ignore_result=True)
def export_version(job_id: int) -> str:
    """Export a version's weights to ONNX with a parity check (ModelJob ``job_id``)."""
    from models_registry.jobs import job_run

    return job_run(job_id=job_id)


@shared_task(name="models_registry.optimise_version", ignore_result=True)
def optimise_version(job_id: int) -> str:
    """Build, register and evaluate an optimised variant of a version (ModelJob ``job_id``)."""
    from models_registry.jobs import job_run

    return job_run(job_id=job_id)


@shared_task(name="models_registry.build_ort_training", ignore_result=True)
def build_ort_training(job_id: int) -> str:
    """Build a version's ONNX Runtime training artifacts (ModelJob ``job_id``, kind ort_training)."""
    from models_registry.jobs import job_run

    return job_run(job_id=job_id)
