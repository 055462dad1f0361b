from __future__ import annotations

from django.db import models


class UpdatePolicy(models.Model):
    """How and when devices may update and train. Assigned to groups or single devices.

    `maintenance_windows` is a list of `{"days": [0..6], "start": "HH:MM", "end": "HH:MM"}`
    in `timezone` (Monday is 0); an empty list means any time.
    `training` is `{"allowed": bool, "require_charging": bool, "require_idle": bool}`.
    """

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    timezone = models.CharField(max_length=64, default="UTC")
    maintenance_windows = models.JSONField(default=list, blank=True)
    training = models.JSONField(default=dict, blank=True)
    max_download_bytes = models.BigIntegerField(null=True, blank=True)
    download_concurrency = models.PositiveIntegerField(null=True, blank=True)
    health_latency_budget_ms = models.FloatField(default=50.0)
    heartbeat_interval_s = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "update policies"

    def __str__(self) -> str:
        return self.name
