"""Enrollment: operators mint tokens, boards trade a token for a device identity."""

from __future__ import annotations

import fnmatch
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone
from rest_framework import status

from core.api import NotFoundError, ServiceError
from core.audit.services import audit_record
from core.events import emit
from devices_agent.wire import TRAINING_BACKENDS
from fleet.auth import hash_secret, new_secret
from fleet.models import Device, DeviceGroup, EnrollmentToken
from fleet.services.releases import device_release_apply

TOKEN_PREFIX_LENGTH = 8
DEFAULT_TOKEN_TTL = timedelta(days=7)


def _clean_tags(tags: list[str]) -> list[str]:
    """Tags keep their first-seen order and appear once."""
    return list(dict.fromkeys(t.strip() for t in tags if t and t.strip()))


def enrollment_token_create(
    *,
    actor: Any,
    name: str = "",
    group: DeviceGroup | None = None,
    tags: list[str] | None = None,
    device_tags_allowed: list[str] | None = None,
    max_uses: int = 1,
    expires_at: datetime | None = None,
    remote_addr: str | None = None,
) -> tuple[EnrollmentToken, str]:
    """Create a token; returns the row and the token itself, which is never stored."""
    if max_uses < 1:
        raise ServiceError("max_uses must be at least 1.", code="validation_error")
    expires = expires_at or timezone.now() + DEFAULT_TOKEN_TTL
    if expires <= timezone.now():
        raise ServiceError("expires_at must be in the future.", code="validation_error")
    secret = new_secret()
    with transaction.atomic():
        token = EnrollmentToken.objects.create(
            name=name,
            token_hash=hash_secret(secret),
            prefix=secret[:TOKEN_PREFIX_LENGTH],
            group=group,
            tags=_clean_tags(tags or []),
            device_tags_allowed=_clean_tags(device_tags_allowed or []),
            max_uses=max_uses,
            expires_at=expires,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        audit_record(
            actor=actor,
            action="enrollment_token.create",
            target=token,
            data={"name": name, "group": group.pk if group else None, "max_uses": max_uses},
            remote_addr=remote_addr,
        )
    return token, secret


def enrollment_token_revoke(*, actor: Any, token_id: int, remote_addr: str | None = None) -> EnrollmentToken:
    """Revoke a token; revoking twice keeps the first revocation time."""
    with transaction.atomic():
        token = EnrollmentToken.objects.select_for_update().filter(pk=token_id).first()
        if token is None:
            raise NotFoundError("No such enrollment token.", code="not_found")
        if token.revoked_at is None:
            token.revoked_at = timezone.now()
            token.save(update_fields=["revoked_at"])
        audit_record(actor=actor, action="enrollment_token.revoke", target=token, remote_addr=remote_addr)
    return token


def _token_error(token: EnrollmentToken | None, now: datetime) -> ServiceError:
    if token is None:
        return ServiceError(
            "Unknown enrollment token.", code="token_invalid", status_code=status.HTTP_401_UNAUTHORIZED
        )
    if token.revoked_at is not None:
        return ServiceError(
            "This enrollment token was revoked.", code="token_revoked", status_code=status.HTTP_403_FORBIDDEN
        )
    if token.expires_at <= now:
        return ServiceError(
            "This enrollment token has expired.",
            code="token_expired",
            status_code=status.HTTP_401_UNAUTHORIZED,
        )
    return ServiceError(
        "This enrollment token has been used up.",
        code="token_exhausted",
        status_code=status.HTTP_403_FORBIDDEN,
    )


def device_enroll(
    *, token: str, name: str, hardware: dict[str, Any], tags: list[str] | None = None
) -> tuple[Device, str]:
    """Trade an enrollment token for a new device; returns the device and its secret.

    The token's use is claimed with one conditional UPDATE (`use_count < max_uses`, not
    revoked, not expired), so concurrent enrollments can never exceed `max_uses`: the
    database serialises the increments and a loser sees zero rows updated.
    """
    now = timezone.now()
    with transaction.atomic():
        row = EnrollmentToken.objects.filter(token_hash=hash_secret(token)).first() if token else None
        if row is None:
            raise _token_error(None, now)
        # Checked before the use is claimed: a refused enrollment costs the token nothing.
        refused = [
            t
            for t in _clean_tags(tags or [])
            if t not in row.tags and not any(fnmatch.fnmatchcase(t, p) for p in row.device_tags_allowed)
        ]
        if refused:
            raise ServiceError(
                f"This token does not let a device add the tags {refused}. Tags decide a device's "
                "groups, so they come from the token or match its device_tags_allowed patterns.",
                code="tags_not_allowed",
                status_code=status.HTTP_403_FORBIDDEN,
                details={"tags": refused, "allowed": row.device_tags_allowed},
            )
        claimed = EnrollmentToken.objects.filter(
            pk=row.pk, use_count__lt=F("max_uses"), revoked_at__isnull=True, expires_at__gt=now
        ).update(use_count=F("use_count") + 1)
        if claimed != 1:
            row.refresh_from_db()
            raise _token_error(row, now)
        secret = new_secret()
        extra = hardware.get("extra")
        facts = dict(extra) if isinstance(extra, dict) else {}
        backends = hardware.get("training_backends")
        if isinstance(backends, list):
            facts["training_backends"] = sorted({str(b) for b in backends if b in TRAINING_BACKENDS})
        if isinstance(hardware.get("python"), str):
            facts["python"] = str(hardware["python"])[:20]
        device = Device.objects.create(
            name=name,
            secret_hash=hash_secret(secret),
            status=Device.Status.PENDING,
            arch=str(hardware.get("arch", ""))[:50],
            cores=hardware.get("cores"),
            ram_mb=hardware.get("ram_mb"),
            accelerator=str(hardware.get("accelerator", ""))[:100],
            os=str(hardware.get("os", ""))[:150],
            agent_version=str(hardware.get("agent_version", ""))[:50],
            hardware=facts,
            tags=_clean_tags([*row.tags, *(tags or [])]),
            enrollment_token=row,
        )
        if row.group_id is not None:
            device.groups.add(row.group_id)
        audit_record(
            actor=None,
            action="device.enroll",
            target=device,
            data={"token_prefix": row.prefix, "name": name},
        )
        emit("device.enrolled", {"device": str(device.pk)})
        # A board joining groups with a release gets it as its desired version at once, so
        # its first heartbeat already carries the model (fleet.services.releases).
        device_release_apply(device=device, trigger="enrollment")
    return device, secret
