"""Every seed in one place: what the demo, the screenshots, the benchmarks and tests put in the database.

- the admin (`seed_admin`);
- the registry's demo models, a digits MLP (production v1) and a digits CNN (staging v1),
  each trained in seconds, and the digits data sets (`registry_seed_demo`,
  `registry_seed_demo_cnn`, `demo_train_weights`);
- the demo fleet's group, update policy and enrollment token (`seed_fleet`), and in the
  background once the simulated fleet is online, the seeded model pushed to it and the
  demo federated job started (`start_federated_job_when_online`, `demo_job_start`);
- `seed_demo`: all of the above that `make demo` needs before the fleet starts;
- for the benchmarks: an enrollment token (`enrollment_token`), a registered digits
  version from seeded initial weights (`digits_version`, a draft) and its promotion to
  production, which every device outside a canary group needs (`promote_to_production`);
- a scratch sample fleet for screenshots and manual checks (`seed_sample_fleet`).

Seeding twice changes nothing, except `seed_sample_fleet` (scratch databases only) and
the tokens, which are fresh each time by design.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
from django.db import transaction

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from models_registry.models import ModelVersion
    from training.models import FederatedJob

DEMO_FAMILY = "digits-mlp"
DEMO_ARCH = "mlp"
DEMO_CNN_FAMILY = "digits-cnn"
DEMO_CNN_ARCH = "cnn"
# Adam converges on the small CNN in a few epochs; more buys little on 300 examples.
DEMO_CNN_EPOCHS = 10
DEMO_GROUP = "demo-fleet"
# The public training slice is small on purpose: enough to calibrate int8 ranges and
# fine-tune a pruned or distilled model, far less than the devices hold between them.
DIGITS_TRAIN_EXAMPLES = 300


# --------------------------------------------------------------------------- the admin


def seed_admin(*, username: str, password: str) -> tuple[User, str]:
    """A superuser in the admin group with ``password``; returns it and its API token."""
    from django.contrib.auth.models import Group, User
    from rest_framework.authtoken.models import Token

    admin, created = User.objects.get_or_create(
        username=username, defaults={"is_superuser": True, "is_staff": True}
    )
    if created or not admin.check_password(password):
        admin.set_password(password)
        admin.is_superuser = admin.is_staff = True
        admin.save()
    admin.groups.add(Group.objects.get(name="admin"))
    token, _ = Token.objects.get_or_create(user=admin)
    return admin, token.key


# --------------------------------------------------------------------------- the registry


def demo_train_weights(
    *, examples: int = 300, epochs: int = 40, seed: int = 0, arch: str = DEMO_ARCH
) -> dict[str, np.ndarray]:
    """Train ``arch`` (default the digits MLP) on the first ``examples`` of the training split.

    Fixed seed, one torch thread. A deliberately small, public slice: the demo's
    federated rounds then have room to improve on it with the devices' own partitions.
    """
    from config.demo.nets import train_weights
    from devices_agent.data import load_digits_split

    x_train, y_train, _, _ = load_digits_split(seed=seed)
    return train_weights(arch, x=x_train[:examples], y=y_train[:examples], epochs=epochs, seed=seed)


def digits_datasets(*, family: Any, seed: int = 0, actor: Any = None) -> tuple[Any, Any]:
    """Register (once) the digits test split and a small public training slice for ``family``.

    The test split evaluates every version of the family (central evaluation); the slice
    (the first 300 training examples) calibrates int8 models and fine-tunes pruned ones.
    """
    from devices_agent.data import load_digits_split
    from models_registry.datasets import dataset_register
    from models_registry.models import EvaluationDataset

    x_train, y_train, x_test, y_test = load_digits_split(seed=seed)
    test = dataset_register(
        name=f"{family.name}-test",
        x=x_test,
        y=y_test,
        family=family,
        split=EvaluationDataset.Split.TEST,
        description=f"scikit-learn digits, stratified 20% test split (seed {seed}), pixels / 16.",
        actor=actor,
    )
    train = dataset_register(
        name=f"{family.name}-train",
        x=x_train[:DIGITS_TRAIN_EXAMPLES],
        y=y_train[:DIGITS_TRAIN_EXAMPLES],
        family=family,
        split=EvaluationDataset.Split.TRAIN,
        description=f"The first {DIGITS_TRAIN_EXAMPLES} examples of the digits training split (seed {seed}).",
        actor=actor,
    )
    return test, train


def seed_digits_family(
    *,
    name: str,
    arch: str,
    stage: str,
    examples: int = 300,
    epochs: int = 40,
    seed: int = 0,
    description: str = "",
    actor: Any = None,
) -> ModelVersion:
    """A digits family with its data sets and a first version of ``arch`` in ``stage``; idempotent.

    The model is trained on the public slice, turned into an upload bundle
    (``devices_agent.program.make_bundle``: program, weights, ONNX) and registered as any
    user's model would be.
    """
    from config.demo.nets import bundle, spec_fields
    from models_registry import services
    from models_registry.models import ModelFamily, ModelVersion

    family = ModelFamily.objects.filter(name=name).first()
    if family is None:
        family = services.family_create(
            name=name, arch=arch, description=description, actor=actor, **spec_fields(arch)
        )
    digits_datasets(family=family, seed=seed, actor=actor)
    existing = (
        family.versions.filter(stage=stage).order_by("number").first()
        or family.versions.order_by("number").first()
    )
    if existing is not None:
        return existing
    weights = demo_train_weights(examples=examples, epochs=epochs, seed=seed, arch=arch)
    made = bundle(arch, weights)
    with transaction.atomic():
        version = services.version_create(
            family=family,
            weights=made.weights,
            onnx=made.onnx,
            program=made.program,
            head=made.head,
            source=ModelVersion.Source.UPLOADED,
            source_detail={"demo": True, "examples": examples, "seed": seed},
            arch=arch,
            notes=f"Demo baseline: trained on {examples} examples of the digits training split.",
            actor=actor,
        )
        services.version_promote(version=version, stage=ModelVersion.Stage.STAGING, actor=actor)
        if stage == ModelVersion.Stage.PRODUCTION:
            return services.version_promote(version=version, stage=stage, actor=actor)
    version.refresh_from_db()
    return version


def registry_seed_demo(*, examples: int = 300, seed: int = 0, actor: Any = None) -> ModelVersion:
    """Make sure family ``digits-mlp`` has a production version (and ``digits-cnn`` a staging one)."""
    production = seed_digits_family(
        name=DEMO_FAMILY,
        arch=DEMO_ARCH,
        stage="production",
        examples=examples,
        seed=seed,
        description="scikit-learn digits (8x8 pixels scaled to [0, 1]), 64 -> 64 -> 64 -> 10 MLP.",
        actor=actor,
    )
    registry_seed_demo_cnn(examples=examples, seed=seed, actor=actor)
    return production


def registry_seed_demo_cnn(*, examples: int = 300, seed: int = 0, actor: Any = None) -> ModelVersion:
    """Make sure family ``digits-cnn`` has a version in staging (the demo fleet runs the MLP)."""
    return seed_digits_family(
        name=DEMO_CNN_FAMILY,
        arch=DEMO_CNN_ARCH,
        stage="staging",
        examples=examples,
        epochs=DEMO_CNN_EPOCHS,
        seed=seed,
        description="scikit-learn digits as 1x8x8 images; two small conv layers and a linear head.",
        actor=actor,
    )


# --------------------------------------------------------------------------- the demo fleet


# The tags `flotilla-agent simulate` gives its boards (and lets a slow profile select a group).
SIMULATED_DEVICE_TAGS = ["simulated", "profile-*"]


def enrollment_token(*, max_uses: int, name: str = "benchmark", actor: Any = None, **fields: Any) -> str:
    """A fresh token for ``max_uses`` simulated devices, valid two hours; returns its secret."""
    from django.utils import timezone

    from fleet.services.enrollment import enrollment_token_create

    fields.setdefault("expires_at", timezone.now() + timedelta(hours=2))
    fields.setdefault("device_tags_allowed", SIMULATED_DEVICE_TAGS)
    _, secret = enrollment_token_create(actor=actor, name=name, max_uses=max_uses, **fields)
    return str(secret)


def seed_fleet(*, devices: int, actor: Any) -> dict[str, str]:
    """The demo group with a permissive update policy, and a token its agents enroll with."""
    from django.utils import timezone

    from fleet.models import DeviceGroup, UpdatePolicy

    policy, _ = UpdatePolicy.objects.get_or_create(
        name="demo",
        defaults={
            "description": "Updates any time; training allowed.",
            "training": {"allowed": True},
            "health_latency_budget_ms": 250.0,
        },
    )
    group, _ = DeviceGroup.objects.get_or_create(
        name=DEMO_GROUP, defaults={"description": "The simulated fleet"}
    )
    if group.policy_id is None:
        group.policy = policy
        group.save(update_fields=["policy"])
    # Agents that enrolled in an earlier run keep their credentials in their state
    # directories; the token is only for the ones enrolling now.
    secret = enrollment_token(
        actor=actor,
        name="demo fleet",
        group=group,
        tags=["demo", "simulated"],
        max_uses=max(devices, 1) * 2,
        expires_at=timezone.now() + timedelta(days=1),
    )
    return {"enrollment_token": secret, "group": DEMO_GROUP}


def seed_demo(
    *, admin_username: str, admin_password: str, devices: int, say: Callable[[str], None] = print
) -> dict[str, str]:
    """What `make demo` needs before its fleet starts: the admin, the demo models, the fleet's token."""
    admin, api_token = seed_admin(username=admin_username, password=admin_password)
    say("seeding the demo model family (digits MLP) ...")
    for version in (registry_seed_demo(), registry_seed_demo_cnn()):
        say(f"{version.label} is in {version.stage} (id {version.pk})")
    fleet = seed_fleet(devices=devices, actor=admin)
    release = release_production(family_name=DEMO_FAMILY, group_name=DEMO_GROUP, actor=admin)
    if release is not None:
        say(f"{release.label} is the release of {DEMO_GROUP}: boards enrolling there get it")
    return {"api_token": api_token, **fleet}


def release_production(*, family_name: str, group_name: str, actor: Any = None) -> ModelVersion | None:
    """Make the family's newest production version the group's release, as an operator would.

    Boards enrolling into the group then get it as their desired version at enrollment
    (`fleet.services.releases`); idempotent. None when the family has no production version.
    """
    from fleet.models import DeviceGroup
    from fleet.services.releases import group_release_set
    from models_registry.models import ModelVersion

    version = (
        ModelVersion.objects.filter(family__name=family_name, stage="production").order_by("-number").first()
    )
    group = DeviceGroup.objects.filter(name=group_name).first()
    if version is None or group is None:
        return None
    group_release_set(
        actor=actor,
        group_id=group.pk,
        version_id=version.pk,
        reason="the demo's known-good model for its fleet",
    )
    return version


# --------------------------------------------------------------------------- the demo federated job


def demo_job_start(
    *, family_name: str, group_name: str, rounds: int = 20, actor: Any = None, **fields: Any
) -> FederatedJob:
    """Create and start a federated job on the simulated fleet's group.

    Starts from the family's newest version that has weights; defaults suit the demo's
    digits MLP (1 local epoch, SGD lr 0.05, FedAvg, int8 deltas, 60 s deadline, ONNX
    export of every round's version).
    """
    from core.api import ServiceError
    from fleet.models import DeviceGroup
    from models_registry.models import Artifact, ModelFamily, ModelVersion
    from training.services import job_create, job_start

    family = ModelFamily.objects.get(name=family_name)
    group = DeviceGroup.objects.get(name=group_name)
    base = (
        ModelVersion.objects.filter(family=family, artifacts__kind=Artifact.Kind.WEIGHTS)
        .order_by("-number")
        .first()
    )
    if base is None:
        raise ServiceError(f"family {family_name!r} has no version with weights", code="no_weights")
    options: dict[str, Any] = {
        "name": "demo federated training",
        "rounds": rounds,
        "min_clients": 2,
        "quorum": 2,
        "local_epochs": 1,
        "lr": 0.05,
        "codec": "int8",
        "round_deadline_s": 60,
    }
    options.update(fields)
    job = job_create(actor=actor, family=family, base_version=base, target_group=group, **options)
    return job_start(job_id=job.pk, actor=actor)


def _assign_model_and_train(
    *,
    family_name: str,
    devices: int,
    group_name: str,
    say: Callable[[str], None],
    min_examples: int = 1,
    job: dict[str, Any] | None = None,
) -> None:
    """Give every board of the group the family's production version; start a job once enough train.

    A board counts once it is online and reports ``min_examples`` labelled examples (its
    application sent them through the local API).
    """
    from django.db import close_old_connections

    from fleet.models import Device
    from fleet.services.devices import device_assign_version
    from models_registry.models import ModelVersion
    from training.models import FederatedJob

    version = (
        ModelVersion.objects.filter(family__name=family_name, stage="production").order_by("-number").first()
    )
    if version is None:
        say(f"no production version of {family_name}; skipping the model push")
        return
    wanted = max(2, (devices * 3) // 4)
    deadline = time.monotonic() + 300
    job_started = FederatedJob.objects.filter(
        family=version.family, status__in=["running", "paused"]
    ).exists()
    while time.monotonic() < deadline:
        close_old_connections()
        members = Device.objects.filter(groups__name=group_name).exclude(status="decommissioned")
        # Boards enrolling now get the group's release at enrollment; one that enrolled in
        # an earlier run, before the group had a release, is given the model here.
        for device_id in members.filter(desired_version__isnull=True).values_list("pk", flat=True):
            device_assign_version(actor=None, device_id=device_id, version_id=version.pk)
        ready = members.filter(status="online", state__local_examples__gte=min_examples).count()
        if not job_started and ready >= wanted:
            started = demo_job_start(family_name=family_name, group_name=group_name, **(job or {}))
            job_started = True
            say(f"{ready} {family_name} boards online with data: started federated job {started.pk}")
        if job_started and members.filter(desired_version__isnull=True).count() == 0 and ready >= devices:
            return
        time.sleep(3)


def start_federated_job_when_online(
    *,
    devices: int,
    group_name: str,
    say: Callable[[str], None],
    family_name: str = DEMO_FAMILY,
    min_examples: int = 1,
    job: dict[str, Any] | None = None,
) -> None:
    """In the background: push the family's model to the group, then start federated training."""

    def run() -> None:
        try:
            _assign_model_and_train(
                family_name=family_name,
                devices=devices,
                group_name=group_name,
                say=say,
                min_examples=min_examples,
                job=job,
            )
        except Exception as exc:  # the demo keeps running; the operator sees why
            say(f"demo set-up step failed: {exc!r}")

    threading.Thread(target=run, name=f"demo-{family_name}", daemon=True).start()


# --------------------------------------------------------------------------- the second family

ACTIVITY_FAMILY = "activity"
ACTIVITY_GROUP = "activity-boards"


def seed_activity_family(*, url: str, api_token: str, say: Callable[[str], None] = print) -> int:
    """The second demo family, registered through the REST API exactly as a user would.

    A 1-D CNN over 3-axis accelerometer windows ([3, 64], six activities), written as a
    plain ``nn.Module`` (``config.demo.nets``), trained for a few epochs on a small public
    set of windows in a neutral style (no board's person), bundled with
    ``devices_agent.program.make_bundle``, uploaded, promoted; and a reference data set for
    drift. The family has no test set: its versions are judged on the boards' holdouts.
    Returns the version id; idempotent (an existing production version is returned).
    """
    import io

    import httpx

    from config.demo.nets import bundle, train_weights
    from devices_agent.data import activity_windows

    api = httpx.Client(base_url=url, headers={"Authorization": f"Token {api_token}"}, timeout=120)
    found = api.get("/api/v1/models/", params={"search": ACTIVITY_FAMILY}).json()
    families = [f for f in found.get("results", []) if f["name"] == ACTIVITY_FAMILY]
    if families:
        family_id = families[0]["id"]
    else:
        created = api.post(
            "/api/v1/models/",
            json={
                "name": ACTIVITY_FAMILY,
                "description": "Six activities from a wrist board's accelerometer, 2 s windows at 32 Hz.",
                "arch": "1-D CNN",
                "task": "classification",
                "input_shape": [3, 64],
                "num_classes": 6,
            },
        )
        created.raise_for_status()
        family_id = created.json()["id"]
    versions = api.get("/api/v1/model-versions/", params={"family": family_id, "stage": "production"}).json()
    if versions.get("results"):
        return int(versions["results"][0]["id"])
    say("training the activity model on a small public set of windows ...")
    parts = [activity_windows(user=10_000 + u, n=40, seed=0, style=False) for u in range(6)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    made = bundle("activity", train_weights("activity", x=x, y=y, epochs=4, seed=0, lr=0.005))
    uploaded = api.post(
        "/api/v1/model-versions/",
        data={"family": str(family_id), "notes": "Demo baseline: 240 public windows, neutral style."},
        files={
            "weights": ("weights.safetensors", made.weights),
            "onnx": ("model.onnx", made.onnx),
            "program": ("program.json", made.program),
        },
    )
    uploaded.raise_for_status()
    version_id = int(uploaded.json()["id"])
    for stage in ("staging", "production"):
        api.post(f"/api/v1/model-versions/{version_id}/promote/", json={"stage": stage}).raise_for_status()
    buffer = io.BytesIO()
    np.savez(buffer, x=x, y=y)
    reference = api.post(
        "/api/v1/datasets/",
        data={"family": str(family_id), "name": "activity-reference", "split": "reference"},
        files={"file": ("reference.npz", buffer.getvalue())},
    )
    if reference.status_code not in (200, 201):
        say(f"no activity reference data set ({reference.status_code}): {reference.text[:200]}")
    return version_id


def seed_activity_fleet(*, devices: int, actor: Any) -> dict[str, str]:
    """The activity boards' group (training allowed) and a token they enroll with."""
    from django.utils import timezone

    from fleet.models import DeviceGroup, UpdatePolicy

    policy = UpdatePolicy.objects.filter(name="demo").first()
    group, _ = DeviceGroup.objects.get_or_create(
        name=ACTIVITY_GROUP,
        defaults={"description": "Wrist boards, each run by flotilla-agent run", "policy": policy},
    )
    secret = enrollment_token(
        actor=actor,
        name="activity boards",
        group=group,
        tags=["demo", "activity"],
        max_uses=max(devices, 1) * 2,
        expires_at=timezone.now() + timedelta(days=1),
    )
    release_production(family_name=ACTIVITY_FAMILY, group_name=ACTIVITY_GROUP, actor=actor)
    return {"enrollment_token": secret, "group": ACTIVITY_GROUP}


# --------------------------------------------------------------------------- benchmarks


def digits_version(
    *, seed: int = 0, arch: str = "mlp", family_name: str = "bench-digits"
) -> tuple[ModelVersion, Any]:
    """A registered digits version (a bundle of seeded initial weights) and its torch module.

    The version belongs to family ``family_name`` (created on first use) and has all three
    artifacts, so boards can serve it, train it and personalise it.
    """
    from config.demo.nets import build_model_for_state, bundle, initial_weights, spec_fields
    from models_registry.models import ModelFamily
    from models_registry.services import family_create, version_create

    weights = initial_weights(arch, seed=seed)
    made = bundle(arch, weights)
    family = ModelFamily.objects.filter(name=family_name).first()
    if family is None:
        family = family_create(name=family_name, arch=arch, **spec_fields(arch))
    version = version_create(
        family=family, weights=made.weights, onnx=made.onnx, program=made.program, head=made.head, arch=arch
    )
    return version, build_model_for_state(arch, weights)


def promote_to_production(*, version: ModelVersion, actor: Any = None) -> ModelVersion:
    """Move a version through staging to production with the registry's own service, each
    step audited as ``actor`` (an admin, or the system for None): only production versions
    may be given to devices outside canary groups."""
    from models_registry.models import ModelVersion
    from models_registry.services import version_promote

    path = {
        ModelVersion.Stage.DRAFT: [ModelVersion.Stage.STAGING, ModelVersion.Stage.PRODUCTION],
        ModelVersion.Stage.ARCHIVED: [ModelVersion.Stage.STAGING, ModelVersion.Stage.PRODUCTION],
        ModelVersion.Stage.STAGING: [ModelVersion.Stage.PRODUCTION],
        ModelVersion.Stage.PRODUCTION: [],
    }[ModelVersion.Stage(version.stage)]
    for stage in path:
        version = version_promote(version=version, stage=stage, actor=actor)
    return version


# --------------------------------------------------------------------------- the sample fleet

SAMPLE_DEVICES = 120


def _sample_versions() -> tuple[ModelVersion, ModelVersion]:
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
    """A small, plausible fleet for screenshots and manual checks of the dashboard.

    Registers the demo digits model (trained and evaluated for real) and an int8 variant
    through the registry's optimisation job, then writes rows the way the running system
    would have: devices with a day of metrics, a rollout in its second wave with its
    decisions, an experiment with a result, and a federated job's rounds. Run it only
    against a scratch database: `python -m config.demo.screenshots --sample` does.
    Returns what was made.
    """
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
    base, variant = _sample_versions()
    # The variant runs on every camera (the rollout below): an admin released it.
    variant = promote_to_production(version=variant, actor=admin)
    rng = random.Random(1)
    now = timezone.now()
    groups = [DeviceGroup.objects.create(name=n) for n in ("line-1", "line-2", "warehouse")]
    devices = []
    for i in range(SAMPLE_DEVICES):
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
