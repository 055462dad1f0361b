"""Fixtures for the dashboard tests: signed-in browsers by role and a small, varied fleet."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest


@pytest.fixture
def page_client(make_user: Any) -> Any:
    """A Django test client signed in (session) as a new user holding `role`."""
    from django.test import Client

    def make(role: str) -> Client:
        client = Client()
        client.force_login(make_user(role))
        return client

    return make


@dataclass
class Fleet:
    """Rows every page has something to show about."""

    family: Any
    version: Any
    candidate: Any
    group: Any
    devices: list[Any]
    job: Any
    rollout: Any
    experiment: Any
    provisioning_job: Any
    token: Any


def make_devices(*, count: int, group: Any = None, version: Any = None, prefix: str = "board") -> list[Any]:
    """`count` devices with groups and hardware facts, created in bulk."""
    from django.utils import timezone

    from fleet.models import Device

    now = timezone.now()
    statuses = ["online", "online", "offline", "pending"]
    rows = [
        Device(
            name=f"{prefix}-{i:05d}",
            status=statuses[i % len(statuses)],
            last_seen=now - timedelta(seconds=30 * i),
            arch="aarch64",
            cores=4,
            ram_mb=2048,
            tags=["camera", f"line-{i % 3}"],
            running_version=version,
            desired_version=version,
            deployment_state=["active", "downloading", "failed", ""][i % 4],
        )
        for i in range(count)
    ]
    Device.objects.bulk_create(rows, batch_size=500)
    if group is not None:
        through = Device.groups.through
        through.objects.bulk_create([through(device_id=d.pk, devicegroup_id=group.pk) for d in rows])
    return rows


def make_version(*, family: Any, parent: Any = None, stage: str = "production", **metrics: Any) -> Any:
    """A registered version of ``family`` (a digits net, or the regression net of a regression
    family) with all three artifacts, promoted through the registry's stages to ``stage``,
    its headline metrics set to ``metrics``."""
    from models_registry.services import version_promote
    from tests.bundles import digits_version, regression_version

    make = regression_version if family.task == "regression" else digits_version
    version = make(family, parent=parent, metrics=metrics or {"accuracy": 0.9})
    path = {"draft": [], "staging": ["staging"], "production": ["staging", "production"]}
    for step in path.get(stage, ["staging", stage]):
        version = version_promote(version=version, stage=step)
    return version


@pytest.fixture
def fleet(db: Any) -> Fleet:
    from django.utils import timezone

    from fleet.models import (
        Deployment,
        DeploymentEvent,
        DeviceCommand,
        DeviceGroup,
        Experiment,
        ExperimentDecision,
        MetricSample,
        ProvisioningJob,
        Rollout,
        RolloutDecision,
        RolloutDevice,
    )
    from fleet.services.enrollment import enrollment_token_create
    from models_registry.models import EvaluationReport
    from tests.bundles import digits_family
    from training.models import ClientUpdate, FederatedJob, FederatedRound

    now = timezone.now()
    family = digits_family("digits")
    version = make_version(family=family)
    candidate = make_version(family=family, parent=version, stage="staging")
    EvaluationReport.objects.create(
        version=candidate,
        dataset="digits-test",
        report={
            "num_examples": 30,
            "num_classes": 3,
            "accuracy": 0.9,
            "loss": 0.31,
            "precision": [0.9, 0.8, 1.0],
            "recall": [1.0, 0.8, 0.9],
            "confusion_matrix": [[10, 0, 0], [1, 8, 1], [0, 1, 9]],
            "roc": [{"fpr": [0, 0.1, 1], "tpr": [0, 0.9, 1]}, None, {"fpr": [0, 1], "tpr": [0, 1]}],
            "auc": [0.95, None, 0.5],
            "macro_auc": 0.725,
            "latency_us": {"batch_1": {"p50_us": 40.0, "p95_us": 60.0}},
            "size_bytes": 20000,
            "parameter_count": 4000,
        },
    )
    group = DeviceGroup.objects.create(name="cameras")
    devices = make_devices(count=6, group=group, version=version)
    first = devices[0]
    deployment = Deployment.objects.create(
        device=first, version=candidate, state="failed", error="health check"
    )
    DeploymentEvent.objects.create(deployment=deployment, state="downloading")
    DeploymentEvent.objects.create(deployment=deployment, state="failed")
    DeviceCommand.objects.create(device=first, kind="diagnostics", status="succeeded", result={"ok": True})
    MetricSample.objects.bulk_create(
        [
            MetricSample(
                device=first, version=version, name=name, value=value + i % 5, ts=now - timedelta(minutes=i)
            )
            for i in range(200)
            for name, value in (
                ("latency_ms", 10.0),
                ("correct", 0.0),
                ("cpu_percent", 30.0),
                ("ram_mb", 300.0),
            )
        ]
    )
    job = FederatedJob.objects.create(
        name="digits federated", family=family, base_version=version, target_group=group, status="running"
    )
    job.current_round = 2
    job.save()
    for number in (1, 2):
        rnd = FederatedRound.objects.create(
            job=job,
            number=number,
            base_version=version,
            status="done" if number == 1 else "collecting",
            selected=[*(str(d.pk) for d in devices[:3]), "not-a-device-id"],
            participants=2,
            bytes_in=20480,
            bytes_out=40960,
            accuracy=0.8 + number / 100 if number == 1 else None,
            loss=0.5 if number == 1 else None,
        )
    ClientUpdate.objects.create(round=rnd, device=devices[0], status="accepted", num_examples=50, bytes=1000)
    ClientUpdate.objects.create(
        round=rnd,
        device=devices[1],
        status="rejected",
        reason_code="non_finite",
        reason_message="NaN in delta",
    )
    rollout = Rollout.objects.create(
        name="v2 to cameras",
        version=candidate,
        target_group=group,
        waves=[{"percent": 50, "soak_s": 60}, {"percent": 100, "soak_s": 0}],
        gates=[{"metric": "latency_p95_ms", "max": 20.0, "min_samples": 30}],
        status="running",
        current_wave=0,
        started_at=now,
    )
    RolloutDevice.objects.create(
        rollout=rollout, device=devices[0], wave=0, state="succeeded", ever_active=True
    )
    RolloutDevice.objects.create(rollout=rollout, device=devices[1], wave=0, state="failed", error="boom")
    RolloutDecision.objects.create(
        rollout=rollout, wave=0, action="start_wave", reason="wave 1 opened", metrics={"latency_p95_ms": 12.5}
    )
    experiment = Experiment.objects.create(
        name="v1 vs v2",
        target_group=group,
        arms=[
            {"name": "control", "version_id": version.pk, "share": 0.5},
            {"name": "candidate", "version_id": candidate.pk, "share": 0.5},
        ],
        status="running",
        started_at=now,
        result={
            "primary_metric": "accuracy",
            "arms": [
                {"arm": 0, "name": "control", "version_id": version.pk, "n": 300, "mean": 0.9},
                {"arm": 1, "name": "candidate", "version_id": candidate.pk, "n": 310, "mean": 0.93},
            ],
            "comparisons": [
                {
                    "arm": 1,
                    "n_control": 300,
                    "n_arm": 310,
                    "diff": 0.03,
                    "ci_low": 0.011,
                    "ci_high": 0.049,
                    "always_valid_p": 0.004,
                    "alpha": 0.05,
                    "fixed_test": {"p_value": 0.001},
                    "enough_samples": True,
                    "significant": True,
                    "direction": "better",
                }
            ],
            "winner": {"arm": 1, "name": "candidate", "summary": "candidate wins on accuracy"},
        },
    )
    ExperimentDecision.objects.create(experiment=experiment, action="continue", reason="not enough samples")
    provisioning_job = ProvisioningJob.objects.create(
        host="10.0.0.9",
        username="pi",
        auth_method="password",
        status="awaiting_host_key",
        host_key_type="ssh-ed25519",
        host_key_fingerprint="SHA256:abc",
        steps=[{"ts": now.isoformat(), "step": "connect", "status": "ok", "message": "connected"}],
    )
    token, _ = enrollment_token_create(actor=None, name="line 3", group=group, max_uses=3)
    return Fleet(
        family=family,
        version=version,
        candidate=candidate,
        group=group,
        devices=devices,
        job=job,
        rollout=rollout,
        experiment=experiment,
        provisioning_job=provisioning_job,
        token=token,
    )
