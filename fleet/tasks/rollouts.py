"""Celery tasks: rollouts."""

__all__: list[str] = []
