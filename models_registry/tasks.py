"""Celery tasks of the model registry."""
