"""python manage.py registry_seed_demo: register the demo digits models (idempotent)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = (
        "Train the digits MLP and CNN on a small public slice and register them as "
        "digits-mlp (production) and digits-cnn (staging)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--examples", type=int, default=300, help="training examples (default 300)")
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args: Any, **options: Any) -> None:
        from models_registry.demo import registry_seed_demo, registry_seed_demo_cnn

        version = registry_seed_demo(examples=options["examples"], seed=options["seed"])
        self.stdout.write(f"{version.label} is in {version.stage} (id {version.pk})")
        # Already seeded by registry_seed_demo: this only reads it back for the report.
        cnn = registry_seed_demo_cnn(examples=options["examples"], seed=options["seed"])
        self.stdout.write(f"{cnn.label} is in {cnn.stage} (id {cnn.pk})")
