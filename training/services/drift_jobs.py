"""A flag that starts the loop: a federated job from the flagged version, on the boards
where it drifted, when the family's policy says so (``FamilyPolicy.drift_job``, off by
default), at most one per family per ``drift_job_interval_s``.

The boards are those running the version whose drift reports alerted lately or whose own
feedback fell behind (``fleet.selectors.revert.drifted_device_ids``). Jobs select their
devices from a group, so the job targets an ad-hoc static group of exactly those boards
(``fleet.services.revert.drift_group_create``): no new way of targeting a job. Every
outcome is a ``VersionDecision`` (``drift_job_started``, or ``drift_job_skipped`` with why:
rate limited, a job of the family already active, no drifted boards, the version cannot
seed a job); a start is audited and announced as ``federated_job.started_by_drift``.

Whether the job's result is then shipped without a click is the policy's ``auto_ship``:
stored and shown, nothing acts on it yet.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from core.api import ServiceError
from core.audit.services import audit_record
from core.events import emit
from fleet.models import VersionDecision
from fleet.selectors.revert import drifted_device_ids, family_policy
from fleet.services.revert import drift_group_create, version_decision_record
from models_registry.models import ModelFamily, ModelVersion
from training.models import FederatedJob
from training.services.jobs import ACTIVE, job_create, job_start

__all__ = ["job_start_for_drift"]


def _skip(version: ModelVersion, why: str, metrics: dict[str, Any], **detail: Any) -> VersionDecision:
    return version_decision_record(
        version=version,
        action=VersionDecision.Action.DRIFT_JOB_SKIPPED,
        trigger=VersionDecision.Trigger.FLAG,
        reason=why,
        metrics=metrics,
        detail=detail,
    )


def job_start_for_drift(*, version_id: int, flag: dict[str, Any], now: Any = None) -> VersionDecision | None:
    """Start a job from a flagged version by its family's policy; the decision, or None when
    the policy has no drift job (nothing is recorded then)."""
    now = now or timezone.now()
    with transaction.atomic():
        version = ModelVersion.objects.select_related("family").filter(pk=version_id).first()
        if version is None:
            return None
        # The family's row serialises two flags of one family, so the rate limit holds.
        ModelFamily.objects.select_for_update().filter(pk=version.family_id).first()
        policy = family_policy(family_id=version.family_id)
        if not policy.drift_job:
            return None
        metrics = {k: v for k, v in flag.items() if k != "version_id"}
        last = (
            VersionDecision.objects.filter(
                family_id=version.family_id,
                action=VersionDecision.Action.DRIFT_JOB_STARTED,
                created_at__gte=now - timedelta(seconds=policy.drift_job_interval_s),
            )
            .order_by("-created_at")
            .first()
        )
        if last is not None:
            return _skip(
                version,
                "rate_limited",
                metrics,
                last_decision=last.pk,
                last_job=last.job_id,
                last_at=last.created_at.isoformat(),
                interval_s=policy.drift_job_interval_s,
            )
        active = (
            FederatedJob.objects.filter(family_id=version.family_id, status__in=ACTIVE)
            .values_list("pk", flat=True)
            .first()
        )
        if active is not None:
            return _skip(version, "job_active", metrics, job=active)
        devices = drifted_device_ids(version=version, now=now)
        if not devices:
            return _skip(version, "no_drifted_devices", metrics)
        clients = max(1, min(2, len(devices)))
        try:
            with transaction.atomic():
                group = drift_group_create(version=version, device_ids=devices, now=now)
                job = job_create(
                    actor=None,
                    family=version.family,
                    base_version=version,
                    target_group=group,
                    name=f"{version.family.name} after drift (v{version.number})",
                    rounds=int(settings.DRIFT_JOB_ROUNDS),
                    min_clients=clients,
                    quorum=clients,
                )
                job_start(job_id=job.pk, actor=None)
        except ServiceError as exc:
            return _skip(version, "cannot_seed", metrics, error=str(exc)[:500])
        decision = version_decision_record(
            version=version,
            action=VersionDecision.Action.DRIFT_JOB_STARTED,
            trigger=VersionDecision.Trigger.FLAG,
            reason=f"flagged {flag.get('reason', '')}: a job on the {len(devices)} boards where it drifted",
            metrics=metrics,
            detail={
                "devices": devices[:500],
                "device_count": len(devices),
                "group": group.pk,
                "group_name": group.name,
                "auto_ship": policy.auto_ship,
            },
            job_id=job.pk,
        )
        audit_record(
            actor=None,
            action="federated_job.started_by_drift",
            target=job,
            data={"decision": decision.pk, "version": version.pk, "devices": len(devices), "group": group.pk},
        )
        emit(
            "federated_job.started_by_drift",
            {
                "decision_id": decision.pk,
                "job": job.pk,
                "version_id": version.pk,
                "family_id": version.family_id,
                "devices": len(devices),
                "group": group.pk,
                "reason": flag.get("reason", ""),
            },
        )
        return decision
