"""Copy what ``FederatedRound.durations`` held into the new fields, and turn lease start
times into expiries.

A separate migration from the schema changes around it: PostgreSQL refuses to alter a
table with row updates still pending in the same transaction.
"""

from datetime import timedelta
import math

from django.conf import settings
from django.db import migrations

PHASES = ("collect_s", "aggregate_s", "evaluate_s")
FIELDS = ["eligible", "server_state_path", *PHASES, "lease_expires_at"]
BATCH = 500


def _lease() -> timedelta:
    return timedelta(seconds=float(getattr(settings, "ROUND_AGGREGATION_LEASE_S", 60.0)))


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _rewrite(apps, change):
    Round = apps.get_model("training", "FederatedRound")
    batch = []
    for rnd in Round.objects.order_by("pk").iterator(chunk_size=BATCH):
        change(rnd)
        batch.append(rnd)
        if len(batch) >= BATCH:
            Round.objects.bulk_update(batch, [*FIELDS, "durations"])
            batch = []
    if batch:
        Round.objects.bulk_update(batch, [*FIELDS, "durations"])


def forwards(apps, schema_editor):
    lease = _lease()

    def change(rnd):
        durations = rnd.durations if isinstance(rnd.durations, dict) else {}
        eligible = _number(durations.get("eligible"))
        rnd.eligible = int(eligible) if eligible is not None and eligible >= 0 else None
        rnd.server_state_path = str(durations.get("server_state") or "")[:300]
        for phase in PHASES:
            setattr(rnd, phase, _number(durations.get(phase)))
        if rnd.lease_expires_at is not None:
            # The column held when the lease was taken or last renewed.
            rnd.lease_expires_at = rnd.lease_expires_at + lease

    _rewrite(apps, change)


def backwards(apps, schema_editor):
    lease = _lease()

    def change(rnd):
        durations = {phase: getattr(rnd, phase) for phase in PHASES if getattr(rnd, phase) is not None}
        if rnd.eligible is not None:
            durations["eligible"] = rnd.eligible
        if rnd.server_state_path:
            durations["server_state"] = rnd.server_state_path
        rnd.durations = durations
        if rnd.lease_expires_at is not None:
            rnd.lease_expires_at = rnd.lease_expires_at - lease

    _rewrite(apps, change)


class Migration(migrations.Migration):
    dependencies = [
        ("training", "0002_round_fields"),
    ]

    operations = [
        migrations.RunPython(forwards, backwards),
    ]
