"""Reads about devices, groups and policies."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime, time
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.db import connection
from django.db.models import Exists, JSONField, OuterRef, Q, QuerySet, TextField, Value
from django.db.models.fields.json import DataContains
from django.db.models.functions import Cast, Lower

from devices_agent.wire import TIME_VARYING_POLICY_FIELDS, Policy
from fleet.models import Deployment, Device, DeviceGroup, GroupReleaseChange, UpdatePolicy

# Tags match case-insensitively. On PostgreSQL a device's tags are compared lower-cased, as
# JSON (`@>`, containment of one element), on an expression with a GIN index of its own
# (migration 0016): lower-casing JSON text keeps it valid JSON, since JSON's own words and
# escapes are lower case or hexadecimal. The expression here must stay the index's.
FOLDED_TAGS = Cast(Lower(Cast("tags", TextField())), JSONField())


def tag_q(tag: str) -> Q:
    """Devices carrying `tag`, in any case.

    PostgreSQL: JSON containment on the lower-cased tags (the GIN index's expression).
    Elsewhere (SQLite has no JSON containment) the quoted tag is matched inside the JSON
    text; tags are restricted to `[A-Za-z0-9_.:=/-]` when written, so a quoted tag can
    only match a whole element.
    """
    if connection.vendor == "postgresql":
        return Q(DataContains(FOLDED_TAGS, Value([tag.lower()], output_field=JSONField())))
    return Q(tags__icontains=json.dumps(tag))


def group_q(group: DeviceGroup) -> Q:
    """Devices in `group`: static members (one index probe per device, no join that could
    repeat a device) and every device carrying all of the group's selector tags."""
    through = Device.groups.through
    condition = Q(Exists(through.objects.filter(device_id=OuterRef("pk"), devicegroup_id=group.pk)))
    selector = [str(t) for t in (group.tag_selector or []) if t]
    if selector:
        tagged = Q()
        for tag in selector:
            tagged &= tag_q(tag)
        condition |= tagged
    return condition


def device_list(*, filters: Mapping[str, Any] | None = None) -> QuerySet[Device]:
    """Devices with what the list shows joined in one query (groups prefetched in a second).

    Filters: `status`, `group` (id or name; static members and tag-selected ones), `tag`,
    `version` (running version id), `desired_version`, `search` (name contains).
    """
    filters = filters or {}
    qs = Device.objects.select_related(
        "running_version__family", "desired_version__family", "policy"
    ).prefetch_related("groups")
    if status := filters.get("status"):
        qs = qs.filter(status=status)
    if tag := filters.get("tag"):
        qs = qs.filter(tag_q(str(tag)))
    if version := filters.get("version"):
        qs = qs.filter(running_version_id=version)
    if desired := filters.get("desired_version"):
        qs = qs.filter(desired_version_id=desired)
    if search := filters.get("search"):
        qs = qs.filter(name__icontains=search)
    if group_key := filters.get("group"):
        key = str(group_key)
        # A number that fits an id names the group's id; anything else its name.
        group = DeviceGroup.objects.filter(pk=int(key)).first() if key.isdigit() and len(key) <= 18 else None
        group = group or DeviceGroup.objects.filter(name=key).first()
        if group is None:
            return qs.none()
        qs = qs.filter(group_q(group))
    return qs


def group_members(*, group: DeviceGroup) -> QuerySet[Device]:
    """Static members plus every device carrying all of the group's selector tags."""
    return Device.objects.filter(group_q(group))


GroupPolicyTable = list[tuple[int, frozenset[str], int]]


def group_policy_table() -> GroupPolicyTable:
    """(group id, lower-cased selector tags, policy id) of every group with a policy, by name."""
    return [
        (int(pk), frozenset(str(t).lower() for t in (selector or [])), int(policy_id))
        for pk, selector, policy_id in DeviceGroup.objects.filter(policy__isnull=False)
        .order_by("name")
        .values_list("pk", "tag_selector", "policy_id")
    ]


def device_static_group_ids(*, device_id: Any) -> frozenset[int]:
    """The ids of the groups a device is a static member of."""
    through = Device.groups.through
    return frozenset(through.objects.filter(device_id=device_id).values_list("devicegroup_id", flat=True))


def device_effective_policy_id(
    *,
    device: Device,
    table: GroupPolicyTable | None = None,
    static_group_ids: frozenset[int] | None = None,
) -> int | None:
    """The id of the policy that applies: the device's own, else its first group's (by name).

    Groups count whether the device is a static member or carries all their selector
    tags. `table` and `static_group_ids` may come from a cache.
    """
    if device.policy_id is not None:
        return device.policy_id
    table = group_policy_table() if table is None else table
    if not table:
        return None
    static = device_static_group_ids(device_id=device.pk) if static_group_ids is None else static_group_ids
    tags = {str(t).lower() for t in (device.tags or [])}
    for pk, selector, policy_id in table:
        if pk in static or (selector and selector <= tags):
            return policy_id
    return None


def device_canary_groups(*, device: Device) -> list[str]:
    """The names of the canary groups a device belongs to (static member or all selector tags)."""
    canaries = list(
        DeviceGroup.objects.filter(canary=True).order_by("name").values_list("pk", "name", "tag_selector")
    )
    if not canaries:
        return []
    static = device_static_group_ids(device_id=device.pk)
    tags = {str(t).lower() for t in (device.tags or [])}
    return [
        name
        for pk, name, selector in canaries
        if pk in static or (selector and {str(t).lower() for t in selector} <= tags)
    ]


def device_group_ids(*, device: Device) -> set[int]:
    """The ids of every group a device belongs to: static member, or carrying all selector tags."""
    ids = set(device_static_group_ids(device_id=device.pk))
    tags = {str(t).lower() for t in (device.tags or [])}
    for pk, selector in DeviceGroup.objects.values_list("pk", "tag_selector"):
        wanted = {str(t).lower() for t in (selector or []) if t}
        if wanted and wanted <= tags:
            ids.add(int(pk))
    return ids


def device_effective_policy(*, device: Device) -> UpdatePolicy | None:
    """The policy that applies to the device (its own, else its first group's), or None."""
    policy_id = device_effective_policy_id(device=device)
    return UpdatePolicy.objects.filter(pk=policy_id).first() if policy_id is not None else None


def _parse_hhmm(value: str) -> time:
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def in_maintenance_window(*, windows: list[dict[str, Any]], tz_name: str, now: datetime) -> bool:
    """Whether `now` falls in one of the windows, read in the policy's time zone.

    No windows means any time. A window whose end is not after its start crosses
    midnight: it runs from `start` on one of its days to `end` on the next day.
    """
    if not windows:
        return True
    try:
        local = now.astimezone(ZoneInfo(tz_name))
    except (ZoneInfoNotFoundError, ValueError):
        local = now
    today, clock = local.weekday(), local.time().replace(tzinfo=None)
    for window in windows:
        days = set(window.get("days") or range(7))
        start, end = _parse_hhmm(window["start"]), _parse_hhmm(window["end"])
        if start < end:
            if today in days and start <= clock < end:
                return True
        else:
            if today in days and clock >= start:
                return True
            if (today - 1) % 7 in days and clock < end:
                return True
    return False


def policy_etag(*, document: Mapping[str, Any]) -> str:
    """A short hash of the policy document without its time-varying fields.

    Equal etags mean the agent's copy of the policy is current; 12 hex digits (48 bits)
    make a collision between two versions of one policy negligible.
    """
    static = {key: value for key, value in document.items() if key not in TIME_VARYING_POLICY_FIELDS}
    canonical = json.dumps(static, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def policy_document(
    *, policy: UpdatePolicy | None, now: datetime, download_size: int | None = None
) -> Policy:
    """The policy as the heartbeat sends it, evaluated at `now`."""
    if policy is None:
        return {
            "name": "default",
            "timezone": "UTC",
            "maintenance_windows": [],
            "in_maintenance_window": True,
            "training": {"allowed": True, "require_charging": False, "require_idle": False},
            "max_download_bytes": None,
            "download_concurrency": None,
            "health_latency_budget_ms": 50.0,
            "download_allowed": True,
        }
    inside = in_maintenance_window(windows=policy.maintenance_windows, tz_name=policy.timezone, now=now)
    fits = (
        policy.max_download_bytes is None
        or download_size is None
        or download_size <= policy.max_download_bytes
    )
    return {
        "name": policy.name,
        "timezone": policy.timezone,
        "maintenance_windows": policy.maintenance_windows,
        "in_maintenance_window": inside,
        "training": policy.training,
        "max_download_bytes": policy.max_download_bytes,
        "download_concurrency": policy.download_concurrency,
        "health_latency_budget_ms": policy.health_latency_budget_ms,
        "download_allowed": inside and fits,
    }


def device_recent_deployments(*, device: Device, limit: int = 10) -> QuerySet[Deployment]:
    """The device's latest deployments, newest first."""
    return Deployment.objects.filter(device=device).select_related("version__family").order_by("-id")[:limit]


def group_release_changes(*, group: DeviceGroup) -> QuerySet[GroupReleaseChange]:
    """Every change of a group's release, newest first, with its versions joined in."""
    return (
        GroupReleaseChange.objects.filter(group=group)
        .select_related("version__family", "previous_version__family")
        .order_by("-created_at", "-id")
    )
