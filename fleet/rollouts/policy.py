"""Update-policy rules as pure functions over the policy's plain fields.

A policy is passed as a mapping with the `UpdatePolicy` field names (`timezone`,
`maintenance_windows`, `training`), so the heartbeat, the rollout engine and tests share
one implementation without touching the ORM.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


def _parse_hhmm(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        # A policy saved with an unknown zone must not stop every update: fall back to UTC.
        return ZoneInfo("UTC")


def _in_window(window: Mapping[str, Any], local: datetime) -> bool:
    days = set(window.get("days") or range(7))
    start = _parse_hhmm(str(window.get("start", "00:00")))
    end = _parse_hhmm(str(window.get("end", "00:00")))
    now_t = local.time().replace(tzinfo=None)
    weekday = local.weekday()
    yesterday = (local - timedelta(days=1)).weekday()
    if start == end:
        # A window that starts and ends at the same minute lasts a whole day from `start`.
        return (weekday in days and now_t >= start) or (yesterday in days and now_t < start)
    if start < end:
        return weekday in days and start <= now_t < end
    # Crossing midnight: the window belongs to the day it starts on, so after midnight
    # it is yesterday's window that is open.
    return (weekday in days and now_t >= start) or (yesterday in days and now_t < end)


def in_maintenance_window(*, policy: Mapping[str, Any] | None, now: datetime) -> bool:
    """Whether `now` falls in one of the policy's recurring maintenance windows.

    Windows are `{"days": [0..6], "start": "HH:MM", "end": "HH:MM"}` in the policy's
    `timezone` (Monday is 0, an empty `days` means every day). A window whose end is
    before its start crosses midnight and belongs to the day it starts on. No policy or
    no windows means updates may happen at any time. `now` must be time-zone aware.
    """
    if now.tzinfo is None:
        raise ValueError("now must be time-zone aware")
    if not policy:
        return True
    windows = policy.get("maintenance_windows") or []
    if not windows:
        return True
    local = now.astimezone(_zone(policy.get("timezone")))
    return any(_in_window(window, local) for window in windows)


def training_allowed(
    *, policy: Mapping[str, Any] | None, device_state: Mapping[str, Any]
) -> tuple[bool, str]:
    """Whether a device may train now, and why not: `(allowed, reason)`.

    `policy["training"]` is `{"allowed": bool, "require_charging": bool, "require_idle":
    bool}` (missing keys: allowed, no requirement). A requirement is met only when the
    device reported it as true; a device that did not say whether it is charging is not
    charging. The reason is "" when allowed, otherwise one of `training_disabled`,
    `not_charging`, `not_idle`.
    """
    rules = (policy or {}).get("training") or {}
    if not rules.get("allowed", True):
        return False, "training_disabled"
    if rules.get("require_charging") and device_state.get("charging") is not True:
        return False, "not_charging"
    if rules.get("require_idle") and device_state.get("idle") is not True:
        return False, "not_idle"
    return True, ""
