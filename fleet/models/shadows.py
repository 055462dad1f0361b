"""Shadow deployments: a candidate version run beside the active one on devices' live inputs."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Shadow(models.Model):
    """A candidate version a set of devices runs in shadow: sampled, within a CPU budget,
    its answers never returned to the applications (``devices_agent.shadow``).

    The members are fixed when it starts (a group's members then, or the devices named).
    A device is in at most one running shadow; starting another moves it.
    """

    class Status(models.TextChoices):
        RUNNING = "running"
        STOPPED = "stopped"

    version = models.ForeignKey(
        "models_registry.ModelVersion", on_delete=models.PROTECT, related_name="shadows"
    )
    group = models.ForeignKey(
        "fleet.DeviceGroup", null=True, blank=True, on_delete=models.SET_NULL, related_name="shadows"
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.RUNNING, db_index=True)
    sample_rate = models.FloatField(default=1.0)
    max_cpu_percent = models.FloatField(null=True, blank=True)
    budget_ms = models.FloatField(null=True, blank=True)
    tolerance = models.FloatField(default=0.0)
    reason = models.CharField(max_length=500, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    stopped_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"shadow {self.pk} of version {self.version_id} ({self.status})"


class ShadowMember(models.Model):
    """A device in a shadow; kept after the shadow stops (its metrics stay the device's)."""

    shadow = models.ForeignKey(Shadow, on_delete=models.CASCADE, related_name="members")
    device = models.ForeignKey("fleet.Device", on_delete=models.CASCADE, related_name="shadow_memberships")
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["shadow", "device"], name="shadow_member_unique")]
        indexes = [models.Index(fields=["device", "active"], name="shadow_member_device_active")]
