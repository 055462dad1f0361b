"""python manage.py registry_seed_demo: register the demo digits model (idempotent)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser


class Command(BaseCommand):
    help = "Train the digits MLP on a small public slice and register it as digits-mlp (production)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--examples", type=int, default=300, help="training examples (default 300)")
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args: Any, **options: Any) -> None:
        from models_registry.demo import registry_seed_demo

        version = registry_seed_demo(examples=options["examples"], seed=options["seed"])
        self.stdout.write(f"{version.label} is in {version.stage} (id {version.pk})")
