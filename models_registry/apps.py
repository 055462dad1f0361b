from django.apps import AppConfig


class ModelsRegistryConfig(AppConfig):
    name = "models_registry"
    verbose_name = "Model registry"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from core import dispatch, events
        from models_registry import subscribers

        events.subscribe(subscribers.version_created, names=["model_version.created"])
        for task in ("evaluate_version", "export_version", "optimise_version", "build_ort_training"):
            dispatch.recoverable(
                f"models_registry.{task}",
                by="models_registry.jobs_resume",
                how="re-sends jobs queued for 5 minutes and running jobs past their lease",
            )
