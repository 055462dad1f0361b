from datetime import datetime, timedelta

from django.apps import AppConfig

# How the work of each training task whose message was lost is found again, and by which
# periodic task (core.dispatch refuses to send a task without one).
RECOVERIES = {
    "training.round_open": (
        "opens the next round of every running job without a collecting, aggregating or "
        "evaluating round, and retries the selection of pending rounds"
    ),
    "training.round_close": (
        "closes every collecting round whose selected devices all answered or whose deadline passed"
    ),
    "training.round_aggregate": (
        "sends again every aggregating or evaluating round whose lease expired, or that no worker "
        "claimed within SWEEP_GRACE_S of closing"
    ),
    "training.shard_aggregate": (
        "through the round: a round whose worker's lease expired is sent again, and its new worker "
        "sends the pending shards again and sums any shard whose lease expired itself"
    ),
}
RECOVERED_BY = {"training.round_aggregate": "core.sweep", "training.shard_aggregate": "core.sweep"}


def _auto_ship_redrive(*, now: datetime, grace: timedelta) -> list[int]:
    from training.services.shipping import auto_ship_redrive

    return auto_ship_redrive(now=now, grace=grace)


def _rounds_redrive(*, now: datetime, grace: timedelta) -> list[int]:
    # Imported when the sweep runs, not at start: the services pull the aggregation code.
    from training.services import rounds_redrive

    return rounds_redrive(now=now, grace=grace)


class TrainingConfig(AppConfig):
    name = "training"
    verbose_name = "Federated training"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from core import sweep
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
        subscribe(subscribers.model_flagged_start_job, names=["model.flagged"])
        subscribe(subscribers.job_succeeded_ship, names=["federated_job.status"])
        for task, how in RECOVERIES.items():
            recoverable(task, by=RECOVERED_BY.get(task, "training.rounds_tick"), how=how)
        sweep.register("training.rounds", _rounds_redrive)
        sweep.register("training.auto_ship", _auto_ship_redrive)
