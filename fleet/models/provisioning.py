"""SSH provisioning: jobs that install the agent on a board, and the host keys operators accepted."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class KnownHost(models.Model):
    """An SSH host key an admin verified and accepted; provisioning connects only to these."""

    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField(default=22)
    key_type = models.CharField(max_length=50)
    key_b64 = models.TextField(help_text="The public key as in known_hosts (base64 of the key blob).")
    fingerprint = models.CharField(max_length=100, help_text="SHA256:… as OpenSSH prints it.")
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    accepted_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["host", "port", "key_type"]
        constraints = [
            models.UniqueConstraint(fields=["host", "port", "key_type"], name="unique_known_host_key")
        ]

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port} {self.key_type} {self.fingerprint}"


class ProvisioningJob(models.Model):
    """One installation of the agent on a board over SSH, with every step it went through.

    The credential is Fernet-encrypted at rest and wiped as soon as the SSH work ends,
    whether it succeeded or not.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        CONNECTING = "connecting"
        AWAITING_HOST_KEY = "awaiting_host_key"
        UPLOADING = "uploading"
        CONFIGURING = "configuring"
        STARTING = "starting"
        WAITING_ENROLLMENT = "waiting_enrollment"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class AuthMethod(models.TextChoices):
        KEY = "key"
        PASSWORD = "password"  # noqa: S105  (the name of a method, not a secret)

    # A worker is running the job in these states; one that stays there past its lease
    # belongs to a worker that died, and a redelivered task may take it over.
    RUNNING = {
        Status.CONNECTING,
        Status.UPLOADING,
        Status.CONFIGURING,
        Status.STARTING,
    }
    TERMINAL = {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED}

    host = models.CharField(max_length=255)
    port = models.PositiveIntegerField(default=22)
    username = models.CharField(max_length=100)
    auth_method = models.CharField(max_length=10, choices=AuthMethod.choices)
    credential_encrypted = models.TextField(blank=True, help_text="Fernet token; empty once used.")
    options = models.JSONField(
        default=dict, blank=True, help_text="python, install_dir, server_url, name, enrollment_timeout_s."
    )
    group = models.ForeignKey(
        "fleet.DeviceGroup", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    tags = models.JSONField(default=list, blank=True)

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    steps = models.JSONField(default=list, blank=True, help_text="[{ts, step, status, message}]")
    error = models.TextField(blank=True)
    error_code = models.CharField(max_length=40, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    locked_until = models.DateTimeField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    enrollment_deadline = models.DateTimeField(null=True, blank=True)

    host_key_type = models.CharField(max_length=50, blank=True)
    host_key_b64 = models.TextField(blank=True)
    host_key_fingerprint = models.CharField(max_length=100, blank=True)
    host_facts = models.JSONField(default=dict, blank=True)

    enrollment_token = models.ForeignKey(
        "fleet.EnrollmentToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    device = models.ForeignKey(
        "fleet.Device", null=True, blank=True, on_delete=models.SET_NULL, related_name="provisioning_jobs"
    )

    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"provision {self.username}@{self.host}:{self.port} ({self.status})"
