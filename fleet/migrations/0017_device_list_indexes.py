"""Indexes for the dashboard on a large fleet.

- the overview's grouped count of devices (running version, update state, status), which
  reads this index alone; it replaces the running version's foreign key index, whose
  lookups it serves too;
- the overview's latest failed deployments, newest first (a partial index, every database);
- on PostgreSQL, a GIN index for the device tag filter (fleet.selectors.devices.tag_q), on
  the expression the filter compares: the lower-cased tags as JSON;
- on PostgreSQL with pg_trgm available, a trigram index for the device name search (the
  ``icontains`` Django writes: ``UPPER(name::text) LIKE UPPER(%s)``).

Other databases match tags and names as text, without an index.
"""

from typing import Any

import django.db.models.deletion
from django.db import DatabaseError, migrations, models, transaction

TAGS_INDEX = "fleet_device_tags_folded"
NAME_INDEX = "fleet_device_name_trgm"


def create(apps: Any, schema_editor: Any) -> None:
    connection = schema_editor.connection
    if connection.vendor != "postgresql":
        return
    schema_editor.execute(
        f"CREATE INDEX IF NOT EXISTS {TAGS_INDEX} ON fleet_device "
        "USING gin (((lower(tags::text))::jsonb) jsonb_path_ops)"
    )
    try:
        # pg_trgm ships with PostgreSQL and is a trusted extension: the database's owner may
        # create it. Where it cannot be created, the search reads the table as before.
        with transaction.atomic(using=connection.alias):
            schema_editor.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except DatabaseError:
        return
    schema_editor.execute(
        f"CREATE INDEX IF NOT EXISTS {NAME_INDEX} ON fleet_device "
        "USING gin ((upper(name::text)) gin_trgm_ops)"
    )


def drop(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP INDEX IF EXISTS {TAGS_INDEX}")
        schema_editor.execute(f"DROP INDEX IF EXISTS {NAME_INDEX}")


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0016_drift_baseline"),
    ]

    operations = [
        migrations.AlterField(
            model_name="device",
            name="running_version",
            field=models.ForeignKey(
                blank=True,
                db_index=False,
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="running_on",
                to="models_registry.modelversion",
            ),
        ),
        migrations.AddIndex(
            model_name="device",
            index=models.Index(fields=["running_version", "deployment_state", "status"], name="device_tally"),
        ),
        migrations.AddIndex(
            model_name="deployment",
            index=models.Index(
                condition=models.Q(("state__in", ["failed", "rolled_back"])),
                fields=["-updated_at", "-id"],
                name="deployment_failed_recent",
            ),
        ),
        migrations.RunPython(create, drop),
    ]
