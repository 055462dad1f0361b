"""Celery tasks: provisioning."""

__all__: list[str] = []
