"""Device commands: an operator queues one, the next heartbeat delivers it, the device answers."""

from __future__ import annotations

from typing import Any

from django.db import transaction
from django.utils import timezone

from core.api import NotFoundError, ServiceError
from core.audit.services import audit_record
from core.events import emit
from devices_agent.wire import Command
from fleet.models import Device, DeviceCommand

COMMAND_KINDS = ("restart", "collect_logs", "diagnostics")


def device_command_create(
    *,
    actor: Any,
    device: Device,
    kind: str,
    args: dict[str, Any] | None = None,
    remote_addr: str | None = None,
) -> DeviceCommand:
    """Queue a command for the device's next heartbeat (and nudge it to heartbeat now)."""
    if kind not in COMMAND_KINDS:
        raise ServiceError(
            f"Unknown command {kind!r}; expected one of {', '.join(COMMAND_KINDS)}.", code="validation_error"
        )
    if device.status == Device.Status.DECOMMISSIONED:
        raise ServiceError("The device is decommissioned.", code="device_decommissioned", status_code=409)
    with transaction.atomic():
        command = DeviceCommand.objects.create(
            device=device,
            kind=kind,
            args=args or {},
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        Device.objects.filter(pk=device.pk).update(has_pending_commands=True)
        audit_record(
            actor=actor,
            action="device.command",
            target=device,
            data={"command": command.pk, "kind": kind, "args": args or {}},
            remote_addr=remote_addr,
        )
        emit("command.queued", {"command_id": command.pk, "device_id": str(device.pk)})
    return command


def device_commands_take(*, device: Device) -> list[Command]:
    """The device's pending commands, marked sent. Called by the heartbeat.

    The flag is cleared before the commands are read: a command queued in between is
    either read now or leaves the flag set for the next heartbeat, never lost.
    """
    if not device.has_pending_commands:
        return []
    with transaction.atomic():
        Device.objects.filter(pk=device.pk).update(has_pending_commands=False)
        pending = list(
            DeviceCommand.objects.filter(device=device, status=DeviceCommand.Status.PENDING)
            .order_by("id")
            .values_list("id", "kind", "args")
        )
        if pending:
            DeviceCommand.objects.filter(
                id__in=[pk for pk, _, _ in pending], status=DeviceCommand.Status.PENDING
            ).update(status=DeviceCommand.Status.SENT, sent_at=timezone.now())
    device.has_pending_commands = False
    return [{"id": pk, "kind": kind, "args": args} for pk, kind, args in pending]


def device_command_record_result(
    *, device: Device, command_id: int, ok: bool, result: dict[str, Any]
) -> DeviceCommand:
    """Store the device's answer to its own command. A repeated answer changes nothing."""
    with transaction.atomic():
        command = DeviceCommand.objects.select_for_update().filter(pk=command_id, device=device).first()
        if command is None:
            raise NotFoundError("No such command for this device.", code="not_found")
        if command.status in (DeviceCommand.Status.SUCCEEDED, DeviceCommand.Status.FAILED):
            return command
        command.status = DeviceCommand.Status.SUCCEEDED if ok else DeviceCommand.Status.FAILED
        command.result = result
        command.finished_at = timezone.now()
        command.save(update_fields=["status", "result", "finished_at"])
    return command
