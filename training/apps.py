from django.apps import AppConfig

# How training.rounds_tick finds the work of each training task whose message was lost
# (core.dispatch refuses to send a task without one).
RECOVERIES = {
    "training.round_open": (
        "opens the next round of every running job without a collecting, aggregating or "
        "evaluating round, and retries the selection of pending rounds"
    ),
    "training.round_close": (
        "closes every collecting round whose selected devices all answered or whose deadline passed"
    ),
    "training.round_aggregate": (
        "sends again every round closed for aggregation whose lease expired, or that no worker "
        "claimed within one lease of closing"
    ),
    "training.shard_aggregate": (
        "sends the round again when its worker's lease expired; that worker sends the pending "
        "shards again and sums any shard whose lease expired itself"
    ),
}


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Federated training"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from core.dispatch import recoverable
        from core.events import subscribe
        from fleet.api.agent_views import register_artifact_entitlement
        from fleet.services.heartbeat import register_task_provider
        from training import subscribers
        from training.selectors import heartbeat_training_tasks, round_artifact_for_device

        # Open rounds reach devices in their heartbeat answer; devices may also long-poll
        # GET rounds/?wait= for a faster start, woken when a round opens.
        register_task_provider(heartbeat_training_tasks)
        # A device selected for a collecting round may fetch its base version's artifacts
        # (the program it trains), whatever model it runs.
        register_artifact_entitlement(round_artifact_for_device)
        subscribe(subscribers.round_opened, names=["federated_round.opened"])
        subscribe(subscribers.model_flagged, names=["model.flagged"])
        for task, how in RECOVERIES.items():
            recoverable(task, by="training.rounds_tick", how=how)
