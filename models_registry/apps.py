from datetime import datetime, timedelta

from django.apps import AppConfig


def _jobs_redrive(*, now: datetime, grace: timedelta) -> list[int]:
    # Imported when the sweep runs, not at start: the jobs module pulls the evaluation code.
    from models_registry.jobs import jobs_redrive

    return jobs_redrive(now=now, grace=grace)


class ModelsRegistryConfig(AppConfig):
    name = "models_registry"
    verbose_name = "Model registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from core import dispatch, events, sweep
        from models_registry import subscribers

        events.subscribe(subscribers.version_created, names=["model_version.created"])
        for task in ("evaluate_version", "export_version", "optimise_version", "build_ort_training"):
            dispatch.recoverable(
                f"models_registry.{task}",
                by="core.sweep",
                how="re-sends jobs queued for SWEEP_GRACE_S and running jobs past their lease",
            )
        sweep.register("models_registry.jobs", _jobs_redrive)
