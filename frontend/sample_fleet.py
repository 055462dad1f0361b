"""A small, plausible fleet for screenshots and manual checks of the dashboard.

`seed_sample_fleet()` registers the demo digits model (trained and evaluated for real),
an int8 variant through the registry's optimisation job, then writes rows the way the
running system would have: devices with a day of metrics, a rollout in its second wave
with its decisions, an experiment with a result, and a federated job's rounds. Run it
only against a scratch database: `python -m frontend.screenshots --sample` does.
"""

from __future__ import annotations

import math
import random
from datetime import timedelta
from typing import Any

DEVICES = 120
METRICS = ("latency_ms", "correct", "confidence", "cpu_percent", "ram_mb")


def _versions() -> tuple[Any, Any]:
    from models_registry.demo import registry_seed_demo
    from models_registry.jobs import job_enqueue, job_run
    from models_registry.models import ModelJob

    base = registry_seed_demo(examples=300, seed=0)
    for kind, params in (("evaluate", {}), ("optimise", {"kind": "int8_dynamic"})):
        job = job_enqueue(kind=kind, version=base, params=params)
        # No worker in a scratch setup: run the job here (the queued message is never consumed).
        job_run(job_id=job.pk)
    variant_job = ModelJob.objects.filter(version=base, kind="optimise").order_by("-id").first()
    variant = variant_job.result_version if variant_job and variant_job.result_version else base
    return base, variant


def seed_sample_fleet(*, admin_username: str, admin_password: str) -> dict[str, Any]:
    """Create the admin and the sample rows; returns what was made."""
    from django.contrib.auth.models import Group, User
    from django.utils import timezone

    from fleet.models import (
        Deployment,
        DeploymentEvent,
        Device,
        DeviceCommand,
        DeviceGroup,
        Experiment,
        ExperimentDecision,
        MetricSample,
        Rollout,
        RolloutDecision,
        RolloutDevice,
    )
    from training.models import ClientUpdate, FederatedJob, FederatedRound

    admin = User.objects.create_user(username=admin_username, password=admin_password)
    admin.groups.add(Group.objects.get(name="admin"))
    base, variant = _versions()
    rng = random.Random(1)
    now = timezone.now()
    groups = [DeviceGroup.objects.create(name=n) for n in ("line-1", "line-2", "warehouse")]
    devices = []
    for i in range(DEVICES):
        status = "offline" if i % 17 == 5 else ("pending" if i % 29 == 3 else "online")
        on_variant = i < 30
        device = Device.objects.create(
            name=f"cam-{groups[i % 3].name}-{i:03d}",
            status=status,
            last_seen=now - timedelta(seconds=rng.randint(2, 50) if status == "online" else 7200),
            arch=rng.choice(["aarch64", "aarch64", "armv7l", "x86_64"]),
            cores=rng.choice([2, 4, 4, 8]),
            ram_mb=rng.choice([1024, 2048, 4096]),
            os="Debian 12",
            agent_version="0.1.0",
            tags=["camera", groups[i % 3].name],
            running_version=variant if on_variant else base,
            desired_version=variant if i < 60 else base,
            deployment_state="active"
            if on_variant
            else ("downloading" if i < 55 else ("failed" if i < 60 else "")),
            state={"local_examples": rng.randint(40, 200), "charging": True, "idle": i % 2 == 0},
        )
        device.groups.add(groups[i % 3])
        devices.append(device)
    focus = devices[0]
    samples = []
    for step in range(24 * 60 // 4):  # a day, every 4 minutes
        ts = now - timedelta(minutes=4 * step)
        wave = math.sin(step / 30)
        samples += [
            MetricSample(
                device=focus, version=variant, name="latency_ms", value=6 + wave + rng.random(), ts=ts
            ),
            MetricSample(
                device=focus, version=variant, name="correct", value=float(rng.random() < 0.93), ts=ts
            ),
            MetricSample(
                device=focus, version=variant, name="confidence", value=0.85 + rng.random() / 10, ts=ts
            ),
            MetricSample(device=focus, version=variant, name="cpu_percent", value=25 + 10 * wave, ts=ts),
            MetricSample(device=focus, version=variant, name="ram_mb", value=310 + rng.random() * 20, ts=ts),
        ]
    MetricSample.objects.bulk_create(samples, batch_size=2000)
    deployment = Deployment.objects.create(
        device=focus, version=variant, state="active", origin_type="rollout"
    )
    for state in ("downloading", "verifying", "installing", "health_check", "active"):
        DeploymentEvent.objects.create(deployment=deployment, state=state)
    failed = Deployment.objects.create(
        device=devices[57],
        version=variant,
        state="rolled_back",
        error="health check: p95 latency 61 ms > 50 ms",
    )
    DeploymentEvent.objects.create(deployment=failed, state="rolled_back")
    DeviceCommand.objects.create(
        device=focus, kind="diagnostics", status="succeeded", result={"disk_free_mb": 5120, "uptime_s": 86000}
    )
    rollout = Rollout.objects.create(
        name=f"{variant.label} int8 to every camera",
        version=variant,
        target_tags=["camera"],
        waves=[{"percent": 10, "soak_s": 600}, {"percent": 50, "soak_s": 900}, {"percent": 100, "soak_s": 0}],
        gates=[
            {"metric": "latency_p95_ms", "max": 20.0, "min_samples": 30},
            {"metric": "accuracy", "max_decrease_pct": 2.0, "min_samples": 100},
        ],
        status="running",
        current_wave=1,
        started_at=now - timedelta(minutes=40),
        wave_started_at=now - timedelta(minutes=12),
    )
    for i, device in enumerate(devices[:60]):
        state = "succeeded" if i < 30 else ("in_progress" if i < 55 else "failed")
        RolloutDevice.objects.create(
            rollout=rollout,
            device=device,
            wave=0 if i < 12 else 1,
            state=state,
            ever_active=state == "succeeded",
        )
    for minutes, action, reason, metrics in (
        (40, "wave_started", "wave 1 opened: 12 devices", {"released": 12}),
        (
            13,
            "advance",
            "wave 1 passed: 12/12 active, gates passed",
            {"latency_p95_ms": 7.9, "accuracy": 0.93},
        ),
        (12, "wave_started", "wave 2 opened: 48 devices", {"released": 48}),
    ):
        RolloutDecision.objects.create(
            rollout=rollout, wave=0 if minutes > 12 else 1, action=action, reason=reason, metrics=metrics
        )
    RolloutDecision.objects.filter(rollout=rollout).update(created_at=now - timedelta(minutes=12))
    experiment = Experiment.objects.create(
        name="fp32 vs int8 on line 2",
        target_group=groups[1],
        arms=[
            {"name": "fp32", "version_id": base.pk, "share": 0.5},
            {"name": "int8", "version_id": variant.pk, "share": 0.5},
        ],
        status="running",
        started_at=now - timedelta(hours=3),
        result={
            "primary_metric": "accuracy",
            "arms": [
                {"arm": 0, "name": "fp32", "version_id": base.pk, "n": 1840, "mean": 0.931},
                {"arm": 1, "name": "int8", "version_id": variant.pk, "n": 1795, "mean": 0.927},
            ],
            "comparisons": [
                {
                    "arm": 1,
                    "n_control": 1840,
                    "n_arm": 1795,
                    "diff": -0.004,
                    "ci_low": -0.029,
                    "ci_high": 0.021,
                    "always_valid_p": 0.81,
                    "alpha": 0.05,
                    "fixed_test": {"p_value": 0.66},
                    "enough_samples": True,
                    "significant": False,
                    "direction": "worse",
                }
            ],
        },
    )
    ExperimentDecision.objects.create(
        experiment=experiment, action="continue", reason="no significant difference yet (p = 0.81)"
    )
    job = FederatedJob.objects.create(
        name="digits, federated on the cameras",
        family=base.family,
        base_version=base,
        target_group=groups[0],
        status="running",
        rounds=20,
        current_round=12,
        strategy="fedavg",
        codec="int8",
        best_accuracy=0.912,
        started_at=now - timedelta(minutes=30),
    )
    members = [d for d in devices if d.groups.filter(pk=groups[0].pk).exists()][:16]
    for number in range(1, 13):
        selected = rng.sample(members, 10)
        done = number < 12
        rnd = FederatedRound.objects.create(
            job=job,
            number=number,
            base_version=base,
            status="done" if done else "collecting",
            selected=[str(d.pk) for d in selected],
            participants=9 if done else 6,
            dropped=1 if done else 0,
            rejected=1 if number == 7 else 0,
            bytes_in=9 * 14_500,
            bytes_out=10 * 57_000,
            accuracy=0.62 + 0.3 * (1 - math.exp(-number / 4)) if done else None,
            loss=1.2 * math.exp(-number / 5) + 0.25 if done else None,
        )
        for device in selected[: (9 if done else 6)]:
            ClientUpdate.objects.create(
                round=rnd,
                device=device,
                status="accepted",
                num_examples=rng.randint(40, 200),
                bytes=14_500,
                norm=round(rng.uniform(0.4, 1.1), 3),
            )
    return {"admin": admin, "base": base, "variant": variant, "rollout": rollout, "job": job}
