"""The Celery application: JSON only, acknowledged late, configured from Django settings."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.demo")

app = Celery("flotilla")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
