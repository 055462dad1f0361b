"""Device authentication: `Authorization: Device <secret>`.

Secrets are 256-bit random strings, so an HMAC-SHA256 under a server key is as strong as a
password hash against guessing while costing microseconds on the heartbeat path, and it
lets the lookup be one indexed equality query.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from django.conf import settings
from rest_framework import authentication, exceptions, permissions

from fleet.models import Device

SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh device or enrollment secret (URL-safe, 43 characters)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str) -> str:
    """The keyed hash stored instead of a secret."""
    key = settings.DEVICE_SECRET_KEY.encode() or settings.SECRET_KEY.encode()
    return hmac.new(key, secret.encode(), hashlib.sha256).hexdigest()


def device_for_secret(secret: str) -> Device | None:
    """The active device holding `secret`, or None (unknown or decommissioned)."""
    if not secret or len(secret) > 200:
        return None
    return (
        Device.objects.filter(secret_hash=hash_secret(secret))
        .exclude(status=Device.Status.DECOMMISSIONED)
        .first()
    )


class DeviceAuthentication(authentication.BaseAuthentication):
    """DRF authentication for the device API; `request.auth` is the Device."""

    keyword = "Device"

    def authenticate(self, request: Any) -> tuple[Any, Device] | None:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        if not header:
            return None
        scheme, _, secret = header.partition(" ")
        if scheme != self.keyword:
            return None
        device = device_for_secret(secret.strip())
        if device is None:
            raise exceptions.AuthenticationFailed("Unknown or revoked device credentials.")
        return (DeviceUser(device), device)

    def authenticate_header(self, request: Any) -> str:
        return self.keyword


class DeviceUser:
    """Stands in for `request.user` on device requests; never an operator."""

    is_authenticated = True
    is_active = True
    is_staff = False
    is_superuser = False
    is_anonymous = False

    def __init__(self, device: Device) -> None:
        self.device = device
        self.pk = None
        self.username = f"device:{device.pk}"

    def __str__(self) -> str:
        return self.username


class IsDevice(permissions.BasePermission):
    """Only authenticated devices; operators' tokens are refused on the device API."""

    message = "Device credentials required (Authorization: Device <secret>)."

    def has_permission(self, request: Any, view: Any) -> bool:
        return isinstance(request.auth, Device)


class DeviceApiMixin:
    """Base settings for every device API view."""

    authentication_classes = [DeviceAuthentication]
    permission_classes = [IsDevice]
