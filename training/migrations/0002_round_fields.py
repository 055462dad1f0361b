from django.db import migrations, models


class Migration(migrations.Migration):
    """Round state in fields of its own (filled from ``durations`` by 0003); the
    aggregation lease column holds its expiry, so it is renamed for what it means."""

    dependencies = [
        ("training", "0001_federated"),
    ]

    operations = [
        migrations.RenameField(
            model_name="federatedround",
            old_name="aggregating_since",
            new_name="lease_expires_at",
        ),
        migrations.AddField(
            model_name="federatedround",
            name="eligible",
            field=models.PositiveIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="federatedround",
            name="collect_s",
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="federatedround",
            name="aggregate_s",
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="federatedround",
            name="evaluate_s",
            field=models.FloatField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="federatedround",
            name="server_state_path",
            field=models.CharField(blank=True, max_length=300),
        ),
    ]
