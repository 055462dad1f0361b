"""Celery tasks of the training app."""
