"""Outbound events: endpoints that subscribe to event types, and every delivery attempt."""

from __future__ import annotations

import uuid

from django.db import models


class WebhookEndpoint(models.Model):
    """A receiver URL. Bodies are signed with HMAC-SHA256 under `secret`."""

    name = models.CharField(max_length=150, blank=True)
    url = models.URLField(max_length=500)
    secret = models.CharField(max_length=128)
    # Event types this endpoint receives (e.g. "rollout.paused", or "rollout.*"); empty = all.
    event_types = models.JSONField(default=list, blank=True)
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.name or self.url


class WebhookDelivery(models.Model):
    """One event for one endpoint, retried with backoff until delivered or out of attempts."""

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"

    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    event_id = models.UUIDField(default=uuid.uuid4, editable=False)
    event_type = models.CharField(max_length=60, db_index=True)
    payload = models.JSONField(default=dict)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=6)
    response_code = models.PositiveIntegerField(null=True, blank=True)
    next_attempt_at = models.DateTimeField(db_index=True)
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
