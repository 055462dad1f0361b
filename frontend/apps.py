from django.apps import AppConfig


class FrontendConfig(AppConfig):
    name = "frontend"
    verbose_name = "Operator dashboard"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from core import events
        from frontend.events import event_received

        # Every domain event refreshes the pages that show it, live.
        events.subscribe(event_received)
