"""Staged rollouts: a version shipped to a target in waves, gated on device metrics."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Rollout(models.Model):
    """A version going out to a target in cumulative waves, each soaked and gated.

    `waves` is a list of `{"percent": p}` or `{"count": n}` (cumulative) with `soak_s`;
    `gates` a list of metric gates (see `fleet.rollouts.gates`). `revision` increases with
    every wave change so a duplicated advance can never move the same wave twice.
    """

    class Status(models.TextChoices):
        DRAFT = "draft"
        # The candidate runs in shadow on the target; the first wave opens when it passes
        # (`fleet.rollouts.shadow_gate`).
        SHADOW = "shadow"
        RUNNING = "running"
        PAUSED = "paused"
        SUCCEEDED = "succeeded"
        ABORTED = "aborted"
        ROLLED_BACK = "rolled_back"
        FAILED = "failed"

    ACTIVE_STATUSES = (Status.SHADOW, Status.RUNNING, Status.PAUSED)

    class OnGateFailure(models.TextChoices):
        PAUSE = "pause"
        ROLLBACK = "rollback"

    name = models.CharField(max_length=150, blank=True)
    version = models.ForeignKey(
        "models_registry.ModelVersion", on_delete=models.PROTECT, related_name="rollouts"
    )
    target_group = models.ForeignKey(
        "fleet.DeviceGroup", null=True, blank=True, on_delete=models.PROTECT, related_name="rollouts"
    )
    target_tags = models.JSONField(default=list, blank=True)
    target_device_ids = models.JSONField(default=list, blank=True)
    waves = models.JSONField(default=list)
    # Share of the exposed devices that must be active before a wave may complete.
    success_threshold = models.FloatField(default=0.95)
    # The wave fails once failed devices exceed this share or reach this count, whichever first.
    error_threshold_share = models.FloatField(default=0.1)
    error_threshold_count = models.PositiveIntegerField(null=True, blank=True)
    gates = models.JSONField(default=list, blank=True)
    on_gate_failure = models.CharField(
        max_length=10, choices=OnGateFailure.choices, default=OnGateFailure.PAUSE
    )
    max_concurrent_downloads = models.PositiveIntegerField(null=True, blank=True)
    max_retries = models.PositiveIntegerField(default=2)
    retry_backoff_s = models.FloatField(default=30.0)
    in_progress_timeout_s = models.FloatField(default=900.0)
    respect_maintenance_windows = models.BooleanField(default=True)
    # A seeded share of the target (percent) that stays on the incumbent while the rollout
    # runs, judged against by `control_gates` and given the version when it succeeds
    # (`fleet.rollouts.control`).
    control_percent = models.FloatField(default=0.0)
    control_gates = models.JSONField(default=list, blank=True)
    # The cohort, chosen once at create (seeded by the rollout's id): device ids.
    control_device_ids = models.JSONField(default=list, blank=True)
    # Target devices left out because they cannot run the version: {device id: reason}.
    held_back = models.JSONField(default=dict, blank=True)
    # A shadow phase before the first wave (`fleet.rollouts.shadow_gate.ShadowPolicy`; empty:
    # none) and the shadow it started.
    shadow_policy = models.JSONField(default=dict, blank=True)
    shadow = models.ForeignKey(
        "fleet.Shadow", null=True, blank=True, on_delete=models.SET_NULL, related_name="rollouts"
    )

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.DRAFT, db_index=True)
    current_wave = models.IntegerField(default=-1)
    wave_started_at = models.DateTimeField(null=True, blank=True)
    revision = models.PositiveIntegerField(default=0)
    status_reason = models.TextField(blank=True)
    origin = models.JSONField(default=dict, blank=True, help_text='e.g. {"experiment": 4}')
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return self.name or f"rollout {self.pk}"


class RolloutDevice(models.Model):
    """One device's part in a rollout: its wave, the version it replaced, how it went."""

    class State(models.TextChoices):
        QUEUED = "queued"  # in an opened wave, waiting for a download slot or window
        IN_PROGRESS = "in_progress"  # told to install; waiting for its report
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        ROLLED_BACK = "rolled_back"
        CANCELLED = "cancelled"  # aborted before it became active

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="members")
    device = models.ForeignKey("fleet.Device", on_delete=models.CASCADE, related_name="rollout_memberships")
    wave = models.PositiveIntegerField()
    previous_version = models.ForeignKey(
        "models_registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    state = models.CharField(max_length=20, choices=State.choices, default=State.QUEUED, db_index=True)
    deployment = models.ForeignKey(
        "fleet.Deployment", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    attempts = models.PositiveIntegerField(default=0)
    attempt_started_at = models.DateTimeField(null=True, blank=True)
    next_retry_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True)
    ever_active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["wave", "id"]
        constraints = [models.UniqueConstraint(fields=["rollout", "device"], name="unique_rollout_device")]


class RolloutDecision(models.Model):
    """Every decision the rollout engine or an operator took, with the numbers behind it."""

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="decisions")
    wave = models.IntegerField()
    action = models.CharField(max_length=40)
    reason = models.TextField(blank=True)
    metrics = models.JSONField(default=dict, blank=True)
    actor = models.CharField(max_length=150, default="system")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
