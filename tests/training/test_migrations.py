"""The round-fields migration: what ``durations`` held moves into fields of its own, and
lease start times become expiries (and back)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

BEFORE = [("training", "0001_federated"), ("models_registry", "0003_job_lease")]
AFTER = [("training", "0004_remove_round_durations"), ("models_registry", "0003_job_lease")]
SINCE = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def _migrate(targets: list[tuple[str, str]]) -> Any:
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    executor.migrate(targets)
    return executor.loader.project_state(targets).apps


@pytest.mark.django_db(transaction=True)
def test_round_durations_move_into_fields(settings: Any) -> None:
    settings.ROUND_AGGREGATION_LEASE_S = 60
    old = _migrate(BEFORE)
    try:
        family = old.get_model("models_registry", "ModelFamily").objects.create(
            name="digits", arch="mlp", input_shape=[64], num_classes=10
        )
        version = old.get_model("models_registry", "ModelVersion").objects.create(family=family, number=1)
        group = old.get_model("fleet", "DeviceGroup").objects.create(name="lab")
        job = old.get_model("training", "FederatedJob").objects.create(
            name="j", family=family, base_version=version, target_group=group
        )
        rounds = old.get_model("training", "FederatedRound").objects
        full = rounds.create(
            job=job,
            number=1,
            base_version=version,
            durations={
                "eligible": 7,
                "collect_s": 12.5,
                "aggregate_s": 0.25,
                "evaluate_s": 1.5,
                "server_state": "federated/job_1/round_0001/server_state.safetensors",
            },
            aggregating_since=SINCE,
        )
        odd = rounds.create(
            job=job, number=2, base_version=version, durations={"collect_s": None, "eligible": "x"}
        )

        new = _migrate(AFTER)
        rounds = new.get_model("training", "FederatedRound").objects
        full = rounds.get(pk=full.pk)
        assert full.eligible == 7 and full.collect_s == 12.5 and full.aggregate_s == 0.25
        assert full.evaluate_s == 1.5
        assert full.server_state_path == "federated/job_1/round_0001/server_state.safetensors"
        assert full.lease_expires_at == SINCE + timedelta(seconds=60)
        odd = rounds.get(pk=odd.pk)
        assert odd.eligible is None and odd.collect_s is None and odd.lease_expires_at is None

        old = _migrate(BEFORE)
        back = old.get_model("training", "FederatedRound").objects.get(pk=full.pk)
        assert back.durations["eligible"] == 7 and back.durations["server_state"].endswith(
            "state.safetensors"
        )
        assert back.aggregating_since == SINCE
    finally:
        _migrate(AFTER)
