"""Task routing: every task goes to one of the three queues, and every way of running
workers (the local stack, `make demo`, docker-compose) consumes what it must."""

from __future__ import annotations

from pathlib import Path

import yaml
from celery import current_app
from django.conf import settings

from config.runner import ALL_QUEUES, worker_command

ROOT = Path(__file__).resolve().parents[2]
QUEUES = ("control", "ml", "io")


def _tasks() -> set[str]:
    current_app.loader.import_default_modules()
    current_app.autodiscover_tasks(force=True)
    return {name for name in current_app.tasks if not name.startswith("celery.")}


def test_every_registered_task_is_routed_to_one_of_the_three_queues() -> None:
    names = _tasks()
    assert {"core.sweep", "training.round_aggregate", "fleet.webhooks_deliver"} <= names
    unrouted = {name for name in names if name not in settings.CELERY_TASK_ROUTES}
    assert unrouted == set(), f"add these tasks to TASK_QUEUES in config/settings/base.py: {unrouted}"
    for name in names:
        route = current_app.amqp.router.route({}, name)
        assert route["queue"].name in QUEUES, (name, route)
    assert set(settings.TASK_QUEUES) == set(QUEUES)
    assert settings.CELERY_TASK_DEFAULT_QUEUE in QUEUES
    # Routes name tasks that exist (a renamed task would silently fall back to the default).
    assert set(settings.CELERY_TASK_ROUTES) <= names


def test_the_kinds_of_work_go_where_they_belong() -> None:
    def queue(name: str) -> str:
        return str(settings.CELERY_TASK_ROUTES[name]["queue"])

    for name in (
        "core.sweep",
        "training.rounds_tick",
        "fleet.rollouts_advance",
        "fleet.experiments_evaluate",
    ):
        assert queue(name) == "control"
    for name in (
        "training.round_aggregate",
        "models_registry.optimise_version",
        "models_registry.build_ort_training",
    ):
        assert queue(name) == "ml"
    assert queue("fleet.webhooks_deliver") == "io"


def test_local_workers_consume_every_queue() -> None:
    """The stack's workers (tests, benchmarks, `make demo`) take every queue by default."""
    import inspect

    from config.stack import Stack

    assert set(ALL_QUEUES.split(",")) == set(QUEUES)
    command = worker_command()
    assert command[command.index("--queues") + 1] == ALL_QUEUES
    assert inspect.signature(Stack.start_worker).parameters["queues"].default == ALL_QUEUES


def test_compose_runs_one_worker_per_queue_and_redis_keeps_an_append_only_file() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in QUEUES:
        command = services[f"worker-{name}"]["command"]
        assert command[command.index("--queues") + 1] == name
        assert "--concurrency" in command
    assert "worker" not in services
    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    data = [v for v in redis["volumes"] if v.split(":")[1] == "/data"]
    assert data and data[0].split(":")[0] in compose["volumes"]
