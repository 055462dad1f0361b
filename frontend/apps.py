from django.apps import AppConfig


class FrontendConfig(AppConfig):
    name = "frontend"
    verbose_name = "Operator dashboard"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Update states reported by devices refresh the fleet pages live.
        from fleet.services.deployments import register_deployment_listener
        from frontend.events import deployment_listener

        register_deployment_listener(deployment_listener)
