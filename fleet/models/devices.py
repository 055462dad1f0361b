from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone

from fleet.models.policies import UpdatePolicy


class DeviceGroup(models.Model):
    """A set of devices: static members plus every device carrying all `tag_selector` tags."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    tag_selector = models.JSONField(default=list, blank=True)
    policy = models.ForeignKey(
        UpdatePolicy, null=True, blank=True, on_delete=models.SET_NULL, related_name="groups"
    )
    # A canary group may take versions in staging (rollouts aimed at exactly this group,
    # experiments on it, manual assignment to its members); every other target takes
    # production versions only (fleet.services.stages). The database default lets code
    # that predates the column (a process still running during an upgrade) insert groups.
    canary = models.BooleanField(
        default=False, db_default=False, help_text="May run versions in staging, not only production ones."
    )
    # The group's current release: the version a board joining the group is given without
    # an operator's action (fleet.services.releases). Set when a rollout aimed at the group
    # succeeds, or by an operator; who, when and why stay on the row (and in
    # GroupReleaseChange, one row per change).
    release_version = models.ForeignKey(
        "models_registry.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="released_to_groups",
    )
    release_set_at = models.DateTimeField(null=True, blank=True)
    release_set_by = models.CharField(max_length=150, blank=True)
    release_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class GroupReleaseChange(models.Model):
    """One change of a group's release (set, replaced or cleared), with who, why and from where."""

    group = models.ForeignKey(DeviceGroup, on_delete=models.CASCADE, related_name="release_changes")
    version = models.ForeignKey(
        "models_registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    previous_version = models.ForeignKey(
        "models_registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # "operator", or "rollout" with the rollout's id (a succeeded rollout, or its rollback).
    origin_type = models.CharField(max_length=20, default="operator")
    origin_id = models.BigIntegerField(null=True, blank=True)
    actor = models.CharField(max_length=150, default="system")
    reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]


class Device(models.Model):
    """A board running the agent."""

    class Status(models.TextChoices):
        PENDING = "pending"  # enrolled, never heard from since
        ONLINE = "online"
        OFFLINE = "offline"
        DECOMMISSIONED = "decommissioned"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=150, db_index=True)
    # HMAC-SHA256 of the device secret under settings.DEVICE_SECRET_KEY; the secret itself
    # is shown once at enrollment and never stored.
    secret_hash = models.CharField(max_length=64, unique=True, null=True, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    last_seen = models.DateTimeField(null=True, blank=True, db_index=True)
    enrolled_at = models.DateTimeField(default=timezone.now)
    decommissioned_at = models.DateTimeField(null=True, blank=True)

    arch = models.CharField(max_length=50, blank=True)
    cores = models.PositiveIntegerField(null=True, blank=True)
    ram_mb = models.PositiveIntegerField(null=True, blank=True)
    accelerator = models.CharField(max_length=100, blank=True)
    os = models.CharField(max_length=150, blank=True)
    agent_version = models.CharField(max_length=50, blank=True)
    hardware = models.JSONField(default=dict, blank=True, help_text="Further facts the agent reported.")
    tags = models.JSONField(default=list, blank=True)
    # What the agent last said about itself (battery, charging, idle, local examples...).
    state = models.JSONField(default=dict, blank=True)
    # The verdict of the device's latest drift report (None: no report yet) and its window's
    # end, kept here so that counts of devices in alert read the device table alone.
    drift_alert = models.BooleanField(null=True, blank=True, db_index=True)
    drift_window_end = models.DateTimeField(null=True, blank=True)

    groups = models.ManyToManyField(DeviceGroup, blank=True, related_name="static_devices")
    policy = models.ForeignKey(
        UpdatePolicy, null=True, blank=True, on_delete=models.SET_NULL, related_name="devices"
    )
    enrollment_token = models.ForeignKey(
        "fleet.EnrollmentToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="devices"
    )

    # Indexed first in `device_tally`, which serves the foreign key's lookups too.
    running_version = models.ForeignKey(
        "models_registry.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="running_on",
        db_index=False,
    )
    desired_version = models.ForeignKey(
        "models_registry.ModelVersion",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="desired_on",
    )
    # The last version that passed its health check before the running one: the rollback target.
    previous_version = models.ForeignKey(
        "models_registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    deployment_state = models.CharField(max_length=20, blank=True, db_index=True)
    # The highest heartbeat `seq` persisted, so a reordered older heartbeat cannot
    # overwrite newer state.
    last_seq = models.BigIntegerField(null=True, blank=True)
    # Set when a command is queued, cleared when a heartbeat delivers commands: the
    # heartbeat reads the device row anyway, so most heartbeats skip the commands query.
    has_pending_commands = models.BooleanField(default=False)

    class Meta:
        ordering = ["name", "id"]
        indexes = [
            models.Index(fields=["status", "name"], name="device_status_name"),
            # Covers the overview's one grouped count of the fleet (frontend.selectors.device_tally),
            # which then reads this index alone instead of every device row.
            models.Index(fields=["running_version", "deployment_state", "status"], name="device_tally"),
        ]

    def __str__(self) -> str:
        return self.name


class EnrollmentToken(models.Model):
    """A one-time (or n-time) secret a board presents to enroll. Only its hash is stored."""

    name = models.CharField(max_length=150, blank=True)
    token_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=12, help_text="First characters, to recognise a token in lists.")
    group = models.ForeignKey(
        DeviceGroup, null=True, blank=True, on_delete=models.SET_NULL, related_name="enrollment_tokens"
    )
    tags = models.JSONField(default=list, blank=True, help_text="Tags given to devices enrolled with it.")
    # Tags select groups, so a device may add its own only where the token allows it:
    # fnmatch patterns (e.g. "profile-*"); any other tag in an enrollment is refused.
    device_tags_allowed = models.JSONField(
        default=list, blank=True, help_text="Patterns of tags a device may add for itself at enrollment."
    )
    max_uses = models.PositiveIntegerField(default=1)
    use_count = models.PositiveIntegerField(default=0)
    expires_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name or 'token'} ({self.prefix}…)"


class Deployment(models.Model):
    """One attempt to bring a device to a model version, with every state it reported."""

    class State(models.TextChoices):
        PENDING = "pending"
        DOWNLOADING = "downloading"
        VERIFYING = "verifying"
        INSTALLING = "installing"
        HEALTH_CHECK = "health_check"
        ACTIVE = "active"
        FAILED = "failed"
        ROLLED_BACK = "rolled_back"
        SUPERSEDED = "superseded"

    TERMINAL = {State.ACTIVE, State.FAILED, State.ROLLED_BACK, State.SUPERSEDED}

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="deployments")
    version = models.ForeignKey(
        "models_registry.ModelVersion", on_delete=models.PROTECT, related_name="deployments"
    )
    state = models.CharField(max_length=20, choices=State.choices, default=State.PENDING, db_index=True)
    # Set by rollouts and experiments so their counts come from one indexed column.
    origin_type = models.CharField(max_length=20, blank=True)
    origin_id = models.BigIntegerField(null=True, blank=True)
    # Sends the device back to a version it ran before (a rollout's rollback, an
    # experiment's restore, an operator's explicit rollback). Only then does the desired
    # state say `rollback` and the artifact's statement get signed for this deployment, so
    # only then may the board install an older version of its family.
    rollback = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            models.Index(fields=["origin_type", "origin_id", "state"], name="deployment_origin"),
            # The overview's alerts: the latest failures, read newest first without a sort.
            models.Index(
                fields=["-updated_at", "-id"],
                name="deployment_failed_recent",
                condition=models.Q(state__in=["failed", "rolled_back"]),
            ),
        ]


class DeploymentEvent(models.Model):
    """A state a device reported for a deployment, in the order received."""

    deployment = models.ForeignKey(Deployment, on_delete=models.CASCADE, related_name="events")
    state = models.CharField(max_length=20)
    message = models.TextField(blank=True)
    detail = models.JSONField(default=dict, blank=True)
    reported_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]


class MetricBatch(models.Model):
    """The idempotency record of one metrics batch: a repeated batch id is a no-op."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="metric_batches")
    batch_id = models.CharField(max_length=64)
    samples = models.PositiveIntegerField()
    received_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["device", "batch_id"], name="unique_metric_batch")]


class MetricSample(models.Model):
    """One on-device measurement (latency_ms, confidence, correct, cpu_percent, ram_mb...)."""

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="+")
    version = models.ForeignKey(
        "models_registry.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    name = models.CharField(max_length=40)
    value = models.FloatField()
    ts = models.DateTimeField()

    class Meta:
        indexes = [
            models.Index(fields=["device", "name", "ts"], name="metric_device_name_ts"),
            models.Index(fields=["version", "name", "ts"], name="metric_version_name_ts"),
        ]


class DeviceCommand(models.Model):
    """An operator's command for one device (restart, collect_logs, diagnostics)."""

    class Status(models.TextChoices):
        PENDING = "pending"
        SENT = "sent"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        EXPIRED = "expired"

    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="commands")
    kind = models.CharField(max_length=40)
    args = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    result = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["-created_at", "-id"]
