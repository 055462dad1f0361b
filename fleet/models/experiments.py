"""A/B experiments: devices of a group split between model versions by a stable hash."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Experiment(models.Model):
    """Arms are `[{"name", "version_id", "share"}]` with shares summing to 1; arm 0 is control.

    `guardrails` are gate-shaped absolute limits (`{"metric", "max"|"min", "min_samples",
    "min_devices"}`, judged on the median of the arm's per-device values) checked on every
    arm; `result` holds the latest evaluation.
    """

    class Status(models.TextChoices):
        DRAFT = "draft"
        RUNNING = "running"
        STOPPED = "stopped"  # a guardrail fired or an operator stopped it
        COMPLETED = "completed"  # a winner was declared
        PROMOTED = "promoted"

    class PrimaryMetric(models.TextChoices):
        ACCURACY = "accuracy"  # mean of `correct`, classification families
        MAE = "mae"  # mean of `abs_error`, regression families; lower is better
        LATENCY = "latency"  # mean of `latency_ms`, any family; lower is better

    name = models.CharField(max_length=150)
    target_group = models.ForeignKey(
        "fleet.DeviceGroup", on_delete=models.PROTECT, related_name="experiments"
    )
    arms = models.JSONField(default=list)
    primary_metric = models.CharField(
        max_length=20, choices=PrimaryMetric.choices, default=PrimaryMetric.ACCURACY
    )
    guardrails = models.JSONField(default=list, blank=True)
    # Devices are the unit of analysis (they are what is randomised): a device counts once
    # it has `min_samples_per_device` samples of the primary metric, an arm is judged once
    # it has `min_devices_per_arm` such devices and `min_samples_per_arm` samples among them.
    min_samples_per_arm = models.PositiveIntegerField(default=200)
    min_samples_per_device = models.PositiveIntegerField(default=20, db_default=20)
    min_devices_per_arm = models.PositiveIntegerField(default=5, db_default=5)
    alpha = models.FloatField(default=0.05)
    # The scale of differences the sequential test is tuned to (accuracy points, or a
    # fraction of control latency or mae); valid for any value, most powerful near it.
    effect_scale = models.FloatField(default=0.05)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT, db_index=True)
    result = models.JSONField(default=dict, blank=True)
    winner_arm = models.IntegerField(null=True, blank=True)
    promoted_rollout = models.ForeignKey(
        "fleet.Rollout", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.name


class ExperimentAssignment(models.Model):
    """Which arm a device is in, and the version it ran before."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="assignments")
    device = models.ForeignKey(
        "fleet.Device", on_delete=models.CASCADE, related_name="experiment_assignments"
    )
    arm = models.PositiveIntegerField()
    version = models.ForeignKey("models_registry.ModelVersion", on_delete=models.PROTECT, related_name="+")
    previous_version = models.ForeignKey(
        "models_registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["arm", "id"]
        constraints = [
            models.UniqueConstraint(fields=["experiment", "device"], name="unique_experiment_device")
        ]


class ExperimentDecision(models.Model):
    """A step of an experiment (started, evaluated, guardrail breach, winner) with numbers."""

    experiment = models.ForeignKey(Experiment, on_delete=models.CASCADE, related_name="decisions")
    action = models.CharField(max_length=40)
    reason = models.TextField(blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    actor = models.CharField(max_length=150, default="system")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
