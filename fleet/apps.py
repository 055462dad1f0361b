from django.apps import AppConfig


class FleetConfig(AppConfig):
    name = "fleet"
    verbose_name = "Fleet"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from core import dispatch, events
        from fleet import nudge
        from fleet.services import revert, webhooks

        # Webhook receivers get the public domain events, whoever emitted them.
        events.subscribe(webhooks.webhook_event_received, public_only=True)
        # Agents heartbeat at once when something concerns them.
        events.subscribe(nudge.nudge_event_received, names=nudge.NUDGE_EVENTS)
        # A flag on a version still watched after its rollout: revert or alert, by policy.
        events.subscribe(revert.model_flagged_received, names=["model.flagged"])

        dispatch.recoverable(
            "fleet.webhooks_deliver",
            by="fleet.webhooks_retry_due",
            how="sends every pending delivery whose next attempt is due",
        )
        dispatch.recoverable(
            "fleet.rollouts_advance_one",
            by="fleet.rollouts_advance",
            how="advances every running rollout every ROLLOUT_TICK_S",
        )
        dispatch.recoverable(
            "fleet.provision_device",
            by="fleet.provisioning_resume",
            how="re-sends queued jobs overdue by a minute and running jobs past their lease",
        )
