"""The heartbeat: the device says how it is, the server answers with its desired state.

This is the hot path (every device, every interval), so it is built to cost one indexed
SELECT (authentication) and one Redis round trip (the rate limit) in the common case:

- a heartbeat that changes nothing but `last_seen` writes no row: the device API put
  "seen now" into the liveness buffer in the rate limit's own pipeline
  (``fleet.services.liveness``), and beat flushes it in bulk. Anything else that changed
  (status, agent version, reported state) is written at once, with `last_seen` and
  `last_seq`; `last_seq` is therefore the `seq` of the last report written. Without Redis
  the heartbeat writes `last_seen` itself, at most every `HEARTBEAT_LAST_SEEN_WRITE_S`
  seconds per device (default 10 s; never more than half the offline threshold,
  interval x missed heartbeats);
- the policy, the artifact references of a version and a device's group policy are read
  through small per-process caches with a short time-to-live
  (`HEARTBEAT_CACHE_TTL_S`, default 10 s): an operator's edit reaches devices within
  that time. Versions and their artifacts never change once created, so the only
  staleness is an artifact added to an existing version. The artifact references carry
  statements signed when they are loaded (`models_registry.selectors.served_ref`), so a
  heartbeat signs nothing except a rollback deployment's statement;
- pending commands are read only when the device row's `has_pending_commands` is set.
"""

from __future__ import annotations

import hashlib
import json
import time as monotonic_time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections
from django.utils import timezone

from core.events import emit
from devices_agent.wire import (
    API_PREFIX,
    ArtifactRef,
    DesiredModel,
    HeartbeatResponse,
    ShadowModel,
    TrainingTask,
)
from fleet.models import Deployment, Device, UpdatePolicy
from fleet.selectors.devices import (
    device_effective_policy_id,
    device_static_group_ids,
    group_policy_table,
    policy_document,
    policy_etag,
)
from fleet.services.commands import device_commands_take
from fleet.services.deployments import OPEN_STATES, deployment_open, deployment_record_status

TaskProvider = Callable[[Device], list[TrainingTask]]
_task_providers: list[TaskProvider] = []


def register_task_provider(provider: TaskProvider) -> TaskProvider:
    """Add `provider(device) -> list[TrainingTask]`, asked on every heartbeat.

    The training app registers its provider in `AppConfig.ready()`. Providers run on the
    hot path: they should answer from the device row or a cache when they have nothing.
    """
    if provider not in _task_providers:
        _task_providers.append(provider)
    return provider


def _ttl() -> float:
    return float(getattr(settings, "HEARTBEAT_CACHE_TTL_S", 10.0))


def _last_seen_write_interval(interval_s: int) -> timedelta:
    # Never so lazy that a live device could look offline: at most half the time after
    # which the offline task gives up on it.
    offline_after = interval_s * settings.OFFLINE_AFTER_MISSED
    return timedelta(seconds=min(float(settings.HEARTBEAT_LAST_SEEN_WRITE_S), offline_after / 2))


class _TtlCache:
    """A per-process dict whose entries expire; cleared whole when it grows too large."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.entries: dict[Any, tuple[float, Any]] = {}
        self.max_entries = max_entries

    def get(self, key: Any, load: Callable[[], Any], ttl_s: float | None = None) -> Any:
        now = monotonic_time.monotonic()
        hit = self.entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        value = load()
        if len(self.entries) >= self.max_entries:
            self.entries.clear()
        self.entries[key] = (now + (_ttl() if ttl_s is None else ttl_s), value)
        return value

    def clear(self) -> None:
        self.entries.clear()


@dataclass(frozen=True)
class _VersionRefs:
    label: str
    family: str
    number: int
    spec: dict[str, Any]
    head: list[str]
    onnx: ArtifactRef | None
    weights: ArtifactRef | None
    program: ArtifactRef | None


_policies = _TtlCache()
_group_policies = _TtlCache()
_device_groups = _TtlCache()
_version_refs = _TtlCache()


_shared = _TtlCache(max_entries=10_000)


def hot_cache(*, key: str, load: Callable[[], Any], ttl_s: float = 2.0) -> Any:
    """`load()`'s value, reused in this process for `ttl_s` seconds.

    For task providers and other code on the heartbeat path that would otherwise run
    the same query for every device on every heartbeat (e.g. the list of collecting
    rounds): one query per process per `ttl_s` instead of one per heartbeat. Keys are
    shared by all callers; prefix them with the app name.
    """
    return _shared.get(key, load, ttl_s)


def hot_cache_forget(*, key: str) -> None:
    """Drop one :func:`hot_cache` entry in this process (after a write that changes it)."""
    _shared.entries.pop(key, None)


def heartbeat_caches_clear() -> None:
    """Forget every cached policy and artifact reference (tests; after bulk edits)."""
    _policies.clear()
    _group_policies.clear()
    _device_groups.clear()
    _version_refs.clear()
    _shared.clear()


def artifact_url(sha256: str) -> str:
    """Where a device downloads the artifact with this digest."""
    return f"{API_PREFIX}artifacts/{sha256}"


def _load_version_refs(version_id: int) -> _VersionRefs | None:
    from models_registry.models import Artifact, ModelVersion
    from models_registry.selectors import served_ref

    version = ModelVersion.objects.select_related("family").filter(pk=version_id).first()
    if version is None:
        return None
    refs: dict[str, ArtifactRef] = {}
    for kind, sha256, size, signature in Artifact.objects.filter(version_id=version_id).values_list(
        "kind", "sha256", "size", "signature"
    ):
        # Signed as served (models_registry.signing): cached with the rest for the TTL.
        refs[kind] = served_ref(
            version=version, kind=kind, sha256=sha256, size=int(size), signature=signature
        )
    return _VersionRefs(
        label=version.label,
        family=version.family.name,
        number=version.number,
        spec=version.family.spec.to_dict(),
        head=list(version.head or []),
        onnx=refs.get("onnx"),
        weights=refs.get("weights"),
        program=refs.get("program"),
    )


def _policy(device: Device) -> UpdatePolicy | None:
    policy_id = device.policy_id
    if policy_id is None:
        # Most fleets have few groups with a policy: the table is one cached list, and a
        # device's static groups are read only when there is a table to match them with.
        table = _group_policies.get(None, group_policy_table)
        if table:
            static = _device_groups.get(device.pk, lambda: device_static_group_ids(device_id=device.pk))
            policy_id = device_effective_policy_id(device=device, table=table, static_group_ids=static)
    if policy_id is None:
        return None
    policy: UpdatePolicy | None = _policies.get(
        policy_id, lambda: UpdatePolicy.objects.filter(pk=policy_id).first()
    )
    return policy


def _desired(device: Device) -> DesiredModel | None:
    version_id = device.desired_version_id
    if version_id is None:
        return None
    refs: _VersionRefs | None = _version_refs.get(version_id, lambda: _load_version_refs(version_id))
    if refs is None or refs.onnx is None:
        # Nothing a device could install yet (the ONNX export is still running).
        return None
    deployment_id: int | None = None
    rollback = False
    if version_id != device.running_version_id:
        found = (
            Deployment.objects.filter(device=device, version_id=version_id, state__in=OPEN_STATES)
            .order_by("-id")
            .values_list("id", "rollback")
            .first()
        )
        if found is None:
            # Whoever set desired_version without opening a deployment (a bulk update).
            deployment_id = deployment_open(device=device, version_id=version_id, nudge=False).pk
        else:
            deployment_id, rollback = found
    artifact = refs.onnx
    if rollback and deployment_id is not None:
        from models_registry.selectors import rollback_ref

        # Only a rollback deployment's statement allows an older version, and it names this
        # deployment and device, so it cannot be replayed as a downgrade anywhere else.
        artifact = rollback_ref(artifact, deployment_id=deployment_id, device_id=str(device.pk))
    desired: DesiredModel = {
        "version_id": version_id,
        "label": refs.label,
        "family": refs.family,
        "number": refs.number,
        "deployment_id": deployment_id,
        "artifact": artifact,
        "weights": refs.weights,
        "spec": refs.spec,  # type: ignore[typeddict-item]
    }
    if rollback:
        desired["rollback"] = True
    if refs.program is not None:
        desired["program"] = refs.program
        desired["head"] = refs.head
    return desired


def _running_shadows() -> dict[str, tuple[Any, ...]]:
    """Device id -> (shadow id, version id, sample rate, max cpu %, budget ms, tolerance)."""
    from fleet.models import Shadow, ShadowMember

    rows = ShadowMember.objects.filter(active=True, shadow__status=Shadow.Status.RUNNING).values_list(
        "device_id",
        "shadow_id",
        "shadow__version_id",
        "shadow__sample_rate",
        "shadow__max_cpu_percent",
        "shadow__budget_ms",
        "shadow__tolerance",
    )
    return {str(row[0]): tuple(row[1:]) for row in rows}


def _shadow(device: Device) -> ShadowModel | None:
    """The candidate the device runs in shadow (``fleet.services.shadows``), or None.

    One cached map of every running shadow's members per process (a couple of seconds),
    so a fleet with no shadow pays one small query per process, not one per heartbeat.
    Only members get the field (a few hundred bytes, on each of their heartbeats): the
    agent stops shadowing when an answer has none.
    """
    from fleet.services.shadows import RUNNING_CACHE_KEY

    running: dict[str, tuple[Any, ...]] = hot_cache(key=RUNNING_CACHE_KEY, load=_running_shadows)
    found = running.get(str(device.pk))
    if found is None:
        return None
    shadow_id, version_id, sample_rate, max_cpu, budget_ms, tolerance = found
    if version_id == device.running_version_id:
        return None  # the candidate is the active model now: nothing to compare
    refs: _VersionRefs | None = _version_refs.get(version_id, lambda: _load_version_refs(version_id))
    if refs is None or refs.onnx is None:
        return None
    shadow: ShadowModel = {
        "shadow_id": int(shadow_id),
        "version_id": int(version_id),
        "label": refs.label,
        "family": refs.family,
        "number": refs.number,
        "artifact": refs.onnx,
        "spec": refs.spec,  # type: ignore[typeddict-item]
        "sample_rate": float(sample_rate),
        "max_cpu_percent": max_cpu,
        "budget_ms": budget_ms,
        "tolerance": float(tolerance),
    }
    return shadow


def desired_etag(desired: DesiredModel) -> str:
    """A short digest of a desired model: the agent echoes it, and the model travels only when it changed."""
    canonical = json.dumps(desired, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:16]


def _liveness_update(device: Device, changes: dict[str, Any], newer_than_seq: int | None) -> int:
    """One UPDATE of `changes` on the device's row unless it was decommissioned meanwhile
    (and, given `newer_than_seq`, unless a newer heartbeat was written meanwhile); the
    rows it changed.

    The statement is written here rather than built through the ORM: building an UPDATE
    with its filters cost more than running it, once per heartbeat of every device. The
    values go through each field's own preparation, exactly as the ORM's update does.
    """
    conn = connections[DEFAULT_DB_ALIAS]
    quote = conn.ops.quote_name
    fields = {f.name: f for f in Device._meta.concrete_fields}
    assignments, params = [], []
    for name, value in changes.items():
        assignments.append(f"{quote(fields[name].column)} = %s")
        params.append(fields[name].get_db_prep_save(value, conn))
    pk, status = quote(fields["id"].column), quote(fields["status"].column)
    # Only column names (from the model) are formatted in; every value is a parameter.
    sql = f"UPDATE {quote(Device._meta.db_table)} SET {', '.join(assignments)} "  # noqa: S608
    sql += f"WHERE {pk} = %s AND NOT ({status} = %s)"
    params += [fields["id"].get_db_prep_value(device.pk, conn), Device.Status.DECOMMISSIONED.value]
    if newer_than_seq is not None:
        last_seq = quote(fields["last_seq"].column)
        sql += f" AND ({last_seq} IS NULL OR {last_seq} < %s)"
        params.append(newer_than_seq)
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        return int(cursor.rowcount)


def _record_liveness(device: Device, report: dict[str, Any], interval_s: int, seen_buffered: bool) -> None:
    now = timezone.now()
    seq = report.get("seq")
    reordered = seq is not None and device.last_seq is not None and seq <= device.last_seq
    changes: dict[str, Any] = {}
    if device.status != Device.Status.ONLINE:
        changes["status"] = Device.Status.ONLINE
    if not reordered:
        agent_version = report.get("agent_version")
        if agent_version and agent_version != device.agent_version:
            changes["agent_version"] = agent_version
        state = report.get("state")
        if state is not None and state != device.state:
            changes["state"] = state
    if not changes and device.last_seen is not None and seen_buffered:
        return  # only liveness: already buffered (fleet.services.liveness)
    if changes or device.last_seen is None or now - device.last_seen >= _last_seen_write_interval(interval_s):
        changes["last_seen"] = now
        newer_than: int | None = None
        if seq is not None and not reordered:
            changes["last_seq"] = seq
            # A newer heartbeat of the same device may have been written meanwhile.
            newer_than = seq
        if _liveness_update(device, changes, newer_than):
            for key, value in changes.items():
                setattr(device, key, value)
            if "status" in changes:  # only a status change refreshes dashboards, not every heartbeat
                emit("device.changed", {"device": str(device.pk), "change": "status"})


def device_heartbeat(
    *, device: Device, report: dict[str, Any], with_tasks: bool = True, seen_buffered: bool = False
) -> HeartbeatResponse:
    """Record a validated heartbeat report and answer with the device's desired state.

    `seen_buffered`: this request's "seen now" is already in the liveness buffer
    (``fleet.auth.seen_buffered``), so a heartbeat that changes nothing else writes no row.
    `with_tasks=False` skips the task providers (the benchmark's measure of this module alone).
    """
    policy = _policy(device)
    interval = (policy.heartbeat_interval_s if policy else None) or settings.HEARTBEAT_INTERVAL_S
    _record_liveness(device, report, interval, seen_buffered)
    deployment = report.get("deployment")
    if deployment and deployment["state"] != device.deployment_state:
        # Heartbeats repeat the current state; the status endpoint is where errors are
        # reported to the agent, so here an unknown or closed deployment is ignored.
        from core.api import ServiceError

        try:
            deployment_record_status(device=device, deployment_id=deployment["id"], state=deployment["state"])
        except ServiceError:
            pass
    desired = _desired(device)
    download_size = desired["artifact"]["size"] if desired else None
    tasks: list[TrainingTask] = []
    for provider in _task_providers if with_tasks else ():
        tasks.extend(provider(device))
    now = timezone.now()
    document = policy_document(policy=policy, now=now, download_size=download_size)
    etag = policy_etag(document=document)
    # Absent keys mean empty or none (see devices_agent.wire): an idle device's answer is
    # a few fields, and the policy travels only when the agent's copy is not current.
    response: HeartbeatResponse = {
        "device_id": str(device.pk),
        "server_time": now.isoformat(timespec="seconds"),  # a clock reference, not a timer
        "heartbeat_interval_s": int(interval),
        "policy_etag": etag,
        "in_window": bool(document.get("in_maintenance_window", True)),
    }
    if report.get("policy_etag") != etag:
        response["policy"] = document
    if desired is not None:
        # The desired model is most of an answer and rarely changes: like the policy, it
        # travels only when the agent's copy (named by its etag) is not current.
        tag = desired_etag(desired)
        response["desired_etag"] = tag
        if report.get("desired_etag") != tag:
            response["desired"] = desired
    if tasks:
        response["tasks"] = tasks
    shadow = _shadow(device)
    if shadow is not None:
        response["shadow"] = shadow
    commands = device_commands_take(device=device)
    if commands:
        response["commands"] = commands
    return response
