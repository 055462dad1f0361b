"""Drift reports: one window of a device's input/confidence sketch, scored on arrival; and
each board's own baseline for the version it runs, what its later windows are judged against."""

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
    # The shift of the window judged against the board's own baseline for the version
    # (DriftBaseline); null when this report was not judged (part of the baseline, or too
    # short and waiting for the board's next windows). An alert needs both.
    baseline_score = models.FloatField(null=True, blank=True)
    baseline_effect_size = models.FloatField(null=True, blank=True)
    baseline_feature_psi = models.FloatField(null=True, blank=True)
    alert = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["device", "-window_end"])]
        ordering = ["-window_end", "-id"]

    def __str__(self) -> str:
        return f"drift {self.device_id} @ {self.window_end:%Y-%m-%d %H:%M}"


class DriftBaseline(models.Model):
    """What one board's inputs looked like while it first ran one version.

    The merged sketch (count, mean, m2, confidence and per-feature histograms) of the
    board's first windows for the version, until they hold ``DRIFT_BASELINE_SAMPLES``
    inputs. A board whose data differs from the reference for good (most boards are not
    IID) is then judged against what is normal for it.
    """

    device = models.ForeignKey("fleet.Device", on_delete=models.CASCADE, related_name="drift_baselines")
    version = models.ForeignKey("models_registry.ModelVersion", on_delete=models.CASCADE, related_name="+")
    sketch = models.JSONField(default=dict)
    windows = models.PositiveIntegerField(default=0)
    complete = models.BooleanField(default=False)
    # After the baseline: the board's windows too short to judge yet, merged.
    pending = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["device", "version"], name="drift_baseline_device_version")
        ]

    def __str__(self) -> str:
        return f"drift baseline {self.device_id} v{self.version_id}"
