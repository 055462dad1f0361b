"""Metric rollups: per device, version and metric, an hour's or a day's count and moments."""

from __future__ import annotations

from django.db import models


class MetricRollup(models.Model):
    """One bucket of raw samples summed up, so history outlives the raw samples.

    Each device keeps its own row (decisions count devices, so a rollup must too); mean and
    spread follow from ``count``, ``total`` and ``total_sq``.
    """

    class Period(models.TextChoices):
        HOUR = "hour"
        DAY = "day"

    period = models.CharField(max_length=4, choices=Period.choices)
    bucket = models.DateTimeField()
    device = models.ForeignKey("fleet.Device", on_delete=models.CASCADE, related_name="+")
    # 0 stands for samples without a version, so the unique key needs no NULL.
    version_key = models.BigIntegerField(default=0)
    name = models.CharField(max_length=40)
    count = models.PositiveIntegerField()
    total = models.FloatField()
    total_sq = models.FloatField()
    low = models.FloatField()
    high = models.FloatField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["period", "bucket", "device", "version_key", "name"], name="unique_metric_rollup"
            )
        ]
        indexes = [
            models.Index(fields=["device", "name", "period", "bucket"], name="rollup_device_name"),
            models.Index(fields=["version_key", "name", "period", "bucket"], name="rollup_version_name"),
        ]

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


class MetricRollupState(models.Model):
    """How far the rollups have read: raw samples with a larger id are not summed yet."""

    rolled_up_to = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)
