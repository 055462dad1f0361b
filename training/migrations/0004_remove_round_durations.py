from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("training", "0003_round_fields_data"),
    ]

    operations = [
        migrations.RemoveField(
            model_name="federatedround",
            name="durations",
        ),
    ]
