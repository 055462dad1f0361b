"""Drift reports: one window of a device's input/confidence sketch, scored on arrival."""

from __future__ import annotations

from django.db import models


class DriftReport(models.Model):
    """A device's sketch for one window, with its score against the version's reference."""

    device = models.ForeignKey("fleet.Device", on_delete=models.CASCADE, related_name="drift_reports")
    version = models.ForeignKey(
        "models_registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    window_start = models.DateTimeField(null=True, blank=True)
    window_end = models.DateTimeField()
    sketch = models.JSONField(default=dict)
    score = models.FloatField(null=True, blank=True)
    z_max = models.FloatField(null=True, blank=True)
    z_feature = models.IntegerField(null=True, blank=True)
    psi = models.FloatField(null=True, blank=True)
    # How large the shift is, next to how significant (z): the largest standardized shift
    # |mean - reference mean| / reference std, and the largest per-feature PSI over the
    # reference's bins with its band (none, moderate, major; blank without binned counts).
    effect_size = models.FloatField(null=True, blank=True)
    effect_feature = models.IntegerField(null=True, blank=True)
    feature_psi = models.FloatField(null=True, blank=True)
    feature_psi_feature = models.IntegerField(null=True, blank=True)
    psi_band = models.CharField(max_length=10, blank=True, default="", db_default="")
    alert = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["device", "-window_end"])]
        ordering = ["-window_end", "-id"]

    def __str__(self) -> str:
        return f"drift {self.device_id} @ {self.window_end:%Y-%m-%d %H:%M}"
