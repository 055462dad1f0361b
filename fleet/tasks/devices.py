"""Celery tasks: devices."""

__all__: list[str] = []
