from django.apps import AppConfig


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Federated training"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Open rounds reach devices in their heartbeat answer; devices may also long-poll
        # GET rounds/?wait= for a faster start.
        from fleet.services.heartbeat import register_task_provider
        from training.selectors import heartbeat_training_tasks

        register_task_provider(heartbeat_training_tasks)
