from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Federated training"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Open rounds reach devices in their heartbeat answer, when the fleet's
        # heartbeat offers the hook; devices can also poll GET rounds/ directly.
        try:
            from fleet.services.heartbeat import (
                register_task_provider,  # type: ignore[import-not-found, unused-ignore]
            )
        except ImportError:
            return
        from training.selectors import training_tasks_for_device

        register_task_provider(training_tasks_for_device)
