"""Reads of the training app: jobs, rounds, eligibility and selection, and what devices
read of a round (their open tasks, the task body, the global weights)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone

from core.api import ConflictError, NotFoundError, ServiceError
from devices_agent.codecs import decode_tensors
from devices_agent.wire import API_PREFIX, TRAINING_BACKENDS, TrainingTask
from fleet.models import Device, DeviceGroup
from models_registry.models import Artifact, ModelVersion
from models_registry.ort_training import NOT_TRAINABLE as ORT_NOT_TRAINABLE
from models_registry.ort_training import READY, ort_training_artifact, ort_training_ref, ort_training_status
from models_registry.selectors import artifact_ref, version_trainable
from training import storage
from training.models import ClientUpdate, FederatedJob, FederatedRound

Weights = dict[str, npt.NDArray[np.float32]]


def job_list() -> QuerySet[FederatedJob]:
    """All jobs, newest first, with what the list shows."""
    return FederatedJob.objects.select_related("family", "base_version", "target_group", "best_version")


def job_rounds(*, job_id: int) -> QuerySet[FederatedRound]:
    """The rounds of one job in order."""
    return FederatedRound.objects.filter(job_id=job_id).select_related("version").order_by("number")


def group_devices(*, group: DeviceGroup) -> list[Device]:
    """Static members of ``group`` plus every device carrying all its ``tag_selector`` tags."""
    members = {d.pk: d for d in group.static_devices.select_related("policy").all()}
    selector = [str(t) for t in (group.tag_selector or [])]
    if selector:
        # Tags are a JSON list; filtering in Python keeps this portable to SQLite.
        for device in Device.objects.select_related("policy").exclude(status=Device.Status.DECOMMISSIONED):
            tags = set(device.tags or [])
            if all(t in tags for t in selector):
                members.setdefault(device.pk, device)
    return sorted(members.values(), key=lambda d: str(d.pk))


def _training_allowed(device: Device, group: DeviceGroup) -> bool:
    policy = device.policy or group.policy
    if policy is None:
        return True
    rules: dict[str, Any] = policy.training or {}
    if not rules.get("allowed", True):
        return False
    state: dict[str, Any] = device.state or {}
    if rules.get("require_charging") and not state.get("charging", False):
        return False
    return not (rules.get("require_idle") and not state.get("idle", False))


# Why a device of the job's group was left out of a round, in the order checked. The
# ort_* reasons leave out boards whose only usable backend is ONNX Runtime: the round's
# version is not trainable with it (an operator without a gradient), its training
# artifacts are not built (yet), or the job is FedProx, which ORT does not train.
FUNNEL_REASONS = (
    "decommissioned",
    "offline",
    "training_not_allowed",
    "too_few_examples",
    "no_holdout",
    "no_backend",
    "ort_not_trainable",
    "ort_no_artifacts",
    "ort_no_fedprox",
)


def job_prox_mu(job: FederatedJob) -> float:
    """The proximal term's weight the job's boards train with (0 unless FedProx)."""
    return float(job.prox_mu) if job.strategy == "fedprox" or job.prox_mu > 0 else 0.0


def ort_unusable(*, job: FederatedJob, version: ModelVersion) -> str | None:
    """Why boards cannot train ``version`` for ``job`` with ONNX Runtime (a funnel reason), or None."""
    if job_prox_mu(job) > 0:
        return "ort_no_fedprox"
    status = ort_training_status(version)
    if status == ORT_NOT_TRAINABLE:
        return "ort_not_trainable"
    if status != READY or ort_training_artifact(version) is None:
        return "ort_no_artifacts"
    return None


def eligibility(
    *, job: FederatedJob, evaluate: bool = False, version: ModelVersion | None = None
) -> tuple[list[Device], dict[str, int]]:
    """Devices of the job's group that may take part now (sorted by id), and the funnel.

    The funnel counts the group's devices (``group``), those left out by the first
    reason that applies (:data:`FUNNEL_REASONS`) and those ``eligible``: it is how an
    operator sees why a round waits or why a board is never chosen. With ``evaluate``
    (an evaluation round) a device also needs a local holdout to judge on. ``version``
    is the round's base version (default: the job's), which decides whether boards that
    train only with ONNX Runtime can take part.
    """
    out: list[Device] = []
    funnel = dict.fromkeys(("group", *FUNNEL_REASONS, "eligible"), 0)
    accepted = set(job.backends or TRAINING_BACKENDS)
    ort_reason = ort_unusable(job=job, version=version or job.base_version) if "ort" in accepted else None
    for device in group_devices(group=job.target_group):
        funnel["group"] += 1
        reason = _left_out(device, job=job, evaluate=evaluate, accepted=accepted, ort_reason=ort_reason)
        if reason is not None:
            funnel[reason] += 1
            continue
        out.append(device)
    funnel["eligible"] = len(out)
    return out, funnel


def _left_out(
    device: Device, *, job: FederatedJob, evaluate: bool, accepted: set[str], ort_reason: str | None
) -> str | None:
    if device.status == Device.Status.DECOMMISSIONED:
        return "decommissioned"
    if job.require_online and device.status != Device.Status.ONLINE:
        return "offline"
    if not _training_allowed(device, job.target_group):
        return "training_not_allowed"
    state = device.state or {}
    # A board without labelled examples cannot train: it is never selected, so it
    # cannot hold a round open until its deadline.
    if int(state.get("local_examples", 0) or 0) < max(1, job.min_local_examples):
        return "too_few_examples"
    if evaluate and int(state.get("holdout_examples", 0) or 0) < 1:
        return "no_holdout"
    # Never a task the board cannot run: it must have one of the job's backends, and one
    # it can train this round's version with.
    usable = set(device_backends(device)) & accepted
    if not usable:
        return "no_backend"
    if usable == {"ort"} and ort_reason is not None:
        return ort_reason
    return None


def eligible_devices(
    *, job: FederatedJob, evaluate: bool = False, version: ModelVersion | None = None
) -> list[Device]:
    """Devices of the job's group that may train now, sorted by id (selection is seeded)."""
    return eligibility(job=job, evaluate=evaluate, version=version)[0]


def device_backends(device: Device) -> list[str]:
    """The training backends a board reported (heartbeat state, else its enrollment facts)."""
    reported = (device.state or {}).get("training_backends")
    if reported is None:
        reported = (device.hardware or {}).get("training_backends")
    if reported is None:
        # Agents that report no backends predate the field and train with PyTorch.
        return ["torch"]
    return [str(b) for b in reported if b in TRAINING_BACKENDS]


def selection_size(*, job: FederatedJob, eligible: int) -> int:
    """How many of ``eligible`` devices a round selects (0 when too few are eligible)."""
    wanted = max(job.min_clients, math.ceil(job.clients_fraction * eligible))
    if eligible < max(1, job.min_clients):
        return 0
    return min(eligible, wanted)


def round_selection(
    *, job: FederatedJob, number: int, evaluate: bool = False, version: ModelVersion | None = None
) -> tuple[list[str], dict[str, int]]:
    """``(chosen device ids, funnel)`` for round ``number`` of ``job`` (see :func:`eligibility`).

    Deterministic for (job seed, round number): a retried ``round_open`` chooses the
    same devices. No devices are chosen while too few are eligible.
    """
    eligible, funnel = eligibility(job=job, evaluate=evaluate, version=version)
    k = selection_size(job=job, eligible=len(eligible))
    if k == 0:
        return [], funnel
    rng = np.random.default_rng([max(job.seed, 0), number])
    ids = [str(d.pk) for d in eligible]
    chosen = sorted(ids[i] for i in rng.choice(len(ids), size=k, replace=False))
    return chosen, funnel


def reported_examples(*, device_ids: list[str]) -> dict[str, list[int]]:
    """``{device id: [training examples, holdout examples]}`` as the devices last reported."""
    out: dict[str, list[int]] = {}
    for pk, state in Device.objects.filter(pk__in=device_ids).values_list("pk", "state"):
        state = state or {}
        out[str(pk)] = [
            max(0, int(state.get("local_examples", 0) or 0)),
            max(0, int(state.get("holdout_examples", 0) or 0)),
        ]
    return out


def round_backends(*, round_ids: list[int]) -> dict[int, dict[str, int]]:
    """Accepted updates per round and training backend (``{"torch": 3, "ort": 1}``), one query."""
    out: dict[int, dict[str, int]] = {rid: {} for rid in round_ids}
    rows = (
        ClientUpdate.objects.filter(round_id__in=round_ids, status=ClientUpdate.Status.ACCEPTED)
        .values_list("round_id", "backend")
        .order_by()
    )
    for round_id, backend in rows:
        key = backend or "unknown"
        out[round_id][key] = out[round_id].get(key, 0) + 1
    return out


def round_updates(*, job_id: int, number: int) -> QuerySet[ClientUpdate]:
    """The updates of round ``number`` of a job, accepted and rejected, with their devices."""
    return (
        ClientUpdate.objects.filter(round__job_id=job_id, round__number=number)
        .select_related("device")
        .order_by("id")
    )


def round_answered(*, rnd: FederatedRound) -> int:
    """How many of the round's selected devices sent an update (accepted or rejected)."""
    return ClientUpdate.objects.filter(round_id=rnd.pk, device_id__in=rnd.selected).count()


def round_task_path(*, round_id: int) -> str:
    """Path of a round's task on the device API."""
    return f"{API_PREFIX}rounds/{round_id}/task"


def collecting_rounds() -> list[tuple[int, frozenset[str], str | None]]:
    """``(round id, selected device ids, deadline)`` of every collecting round."""
    return [
        (r.pk, frozenset(r.selected or []), r.deadline.isoformat() if r.deadline else None)
        for r in FederatedRound.objects.filter(status=FederatedRound.Status.COLLECTING).only(
            "id", "selected", "deadline"
        )
    ]


def training_tasks_for_device(
    device: Device, *, rounds: list[tuple[int, frozenset[str], str | None]] | None = None
) -> list[TrainingTask]:
    """Open rounds that selected ``device`` and have no update from it yet.

    Served at ``GET rounds/``. ``rounds`` is :func:`collecting_rounds`, passed in when
    the caller caches it (the heartbeat does, see :func:`heartbeat_training_tasks`).
    """
    device_id = str(device.pk)
    # Few rounds collect at once, so the JSON membership test runs in Python (portable
    # to SQLite, which cannot index into JSON lists).
    mine = [r for r in (collecting_rounds() if rounds is None else rounds) if device_id in r[1]]
    if not mine:
        return []
    done = set(
        ClientUpdate.objects.filter(round_id__in=[r[0] for r in mine], device=device).values_list(
            "round_id", flat=True
        )
    )
    now = timezone.now().isoformat()
    return [
        TrainingTask(
            kind="train", round_id=rid, task_url=round_task_path(round_id=rid), deadline=deadline or now
        )
        for rid, _, deadline in mine
        if rid not in done
    ]


def heartbeat_training_tasks(device: Device) -> list[TrainingTask]:
    """The heartbeat's task provider: the collecting rounds are read once per process every
    2 s (not per heartbeat), so a device without a task costs no query at all."""
    from fleet.services.heartbeat import hot_cache

    rounds = hot_cache(key="training:collecting_rounds", load=collecting_rounds, ttl_s=2.0)
    return training_tasks_for_device(device, rounds=rounds)


# --------------------------------------------------------------------------- device reads


def round_artifact_for_device(device: Device, sha256: str) -> tuple[str, int] | None:
    """``(storage name, size)`` of an artifact of a collecting round's base version that
    selected ``device``, or None: the device-API download entitlement of training."""
    bases = [
        base
        for base, selected in FederatedRound.objects.filter(
            status=FederatedRound.Status.COLLECTING
        ).values_list("base_version_id", "selected")
        if str(device.pk) in (selected or [])
    ]
    if not bases:
        return None
    found = Artifact.objects.filter(sha256=sha256, version_id__in=bases).values_list("file", "size").first()
    if found is None:
        # The ONNX Runtime training artifacts a base version trains from may be its
        # ancestor's (the same graph).
        sources = [
            record.get("from_version")
            for record in ModelVersion.objects.filter(pk__in=bases).values_list("ort_training", flat=True)
            if isinstance(record, dict) and record.get("status") == READY
        ]
        found = (
            Artifact.objects.filter(sha256=sha256, kind=Artifact.Kind.ORT_TRAINING, version_id__in=sources)
            .values_list("file", "size")
            .first()
        )
    return (str(found[0]), int(found[1])) if found else None


def round_for_device(*, round_id: int, device: Device) -> FederatedRound:
    """The round ``round_id`` if it selected ``device`` (404 ``not_found``, 403 ``not_selected``)."""
    rnd = (
        FederatedRound.objects.select_related("job", "job__family", "base_version")
        .filter(id=round_id)
        .first()
    )
    if rnd is None:
        raise NotFoundError("No such round.", code="not_found")
    if str(device.pk) not in (rnd.selected or []):
        raise ServiceError(
            "This device was not selected for the round.", code="not_selected", status_code=403
        )
    return rnd


def round_task(*, round_id: int, device: Device) -> dict[str, Any]:
    """What a selected device needs to train for a round (the ``rounds/<id>/task`` body)."""
    rnd = round_for_device(round_id=round_id, device=device)
    if rnd.status != FederatedRound.Status.COLLECTING:
        raise ConflictError(f"Round is {rnd.status}, not collecting.", code="round_closed")
    return _round_task_body(rnd)


def collecting_round_task(*, round_id: int, deadline: str = "") -> dict[str, Any] | None:
    """The task body of a collecting round, the same for every device it selected; None
    once the round stopped collecting.

    For callers that already know the device is selected (the long poll of ``GET rounds/``,
    which lists only collecting rounds that selected it): the body is built once per
    process per 2 s instead of once per device, since nothing in it changes while the
    round collects (its base version, weights, deadline and job are fixed when it opens).
    ``deadline`` (from :func:`collecting_rounds`) is part of the key, so a round opened
    again under the same id is never answered from an older entry.
    """
    from fleet.services.heartbeat import hot_cache

    def load() -> dict[str, Any] | None:
        rnd = (
            FederatedRound.objects.select_related("job", "job__family", "base_version")
            .filter(id=round_id, status=FederatedRound.Status.COLLECTING)
            .first()
        )
        return _round_task_body(rnd) if rnd is not None else None

    body: dict[str, Any] | None = hot_cache(
        key=f"training:round_task:{int(round_id)}:{deadline}", load=load, ttl_s=2.0
    )
    return body


def _round_task_body(rnd: FederatedRound) -> dict[str, Any]:
    job = rnd.job
    base = rnd.base_version
    program = artifact_ref(base, Artifact.Kind.PROGRAM)
    if program is None:
        raise ConflictError(f"{base.label} has no program to train.", code="no_program")
    return {
        "round_id": rnd.pk,
        "job_id": job.pk,
        "round_number": rnd.number,
        "base_version_id": rnd.base_version_id,
        "spec": job.family.spec.to_dict(),
        "program": program,
        "trainable": round_trainable(rnd=rnd),
        "backends": list(job.backends or TRAINING_BACKENDS),
        # For boards that train with ONNX Runtime (None: they are not selected).
        "ort_training": ort_training_ref(base),
        "failure_url": f"{API_PREFIX}rounds/{rnd.pk}/failure",
        # An evaluation round: measure the global model on the holdout, train nothing.
        "evaluate_only": rnd.kind == FederatedRound.Kind.EVALUATE,
        "evaluation_url": f"{API_PREFIX}rounds/{rnd.pk}/evaluation",
        "weights_url": f"{API_PREFIX}rounds/{rnd.pk}/weights",
        "weights_sha256": rnd.weights_sha256,
        "weights_size": rnd.weights_size,
        "update_url": f"{API_PREFIX}rounds/{rnd.pk}/update",
        "deadline": rnd.deadline.isoformat() if rnd.deadline else None,
        "seed": int(job.seed) * 100_003 + rnd.number,
        "train": {
            "epochs": job.local_epochs,
            "batch_size": job.batch_size,
            "optimizer": job.optimizer,
            "lr": job.lr,
            "prox_mu": job_prox_mu(job),
        },
        "clip_norm": job.clip_norm,
        "codec": job.codec,
        "topk_fraction": job.topk_fraction,
        "max_update_bytes": int(settings.ROUND_UPDATE_MAX_BYTES),
    }


# Every selected device fetches the round's weights and every upload is validated against
# them, so both forms are kept per process, by digest (a digest never changes meaning).
_bytes_cache: dict[str, bytes] = {}
_weights_cache: dict[str, Weights] = {}
_state_cache: dict[str, dict[str, npt.NDArray[Any]]] = {}
_CACHE_SIZE = 8


def round_for_download(*, round_id: int, device: Device) -> FederatedRound:
    """:func:`round_for_device` for the weights download, read once per process per 2 s.

    Every selected device downloads the same round's weights at the same moment; what the
    check reads (the selection, the weights' path and digest) is fixed once the round
    opened, so only opened rounds are kept.
    """
    from fleet.services.heartbeat import hot_cache

    def load() -> FederatedRound | None:
        rnd = FederatedRound.objects.filter(id=round_id).first()
        return rnd if rnd is not None and rnd.opened_at is not None else None

    rnd: FederatedRound | None = hot_cache(
        key=f"training:round_download:{int(round_id)}", load=load, ttl_s=2.0
    )
    if rnd is None:
        return round_for_device(round_id=round_id, device=device)
    if str(device.pk) not in (rnd.selected or []):
        raise ServiceError(
            "This device was not selected for the round.", code="not_selected", status_code=403
        )
    return rnd


def round_weights_bytes(*, rnd: FederatedRound) -> bytes:
    """The round's global weights file (safetensors)."""
    data = _bytes_cache.get(rnd.weights_sha256)
    if data is None:
        data = storage.read_bytes(name=rnd.weights_path)
        if len(_bytes_cache) > _CACHE_SIZE:
            _bytes_cache.clear()
        _bytes_cache[rnd.weights_sha256] = data
    return data


def round_state(*, rnd: FederatedRound) -> dict[str, npt.NDArray[Any]]:
    """Every tensor of the round's global model (parameters, buffers, constants), as stored."""
    cached = _state_cache.get(rnd.weights_sha256)
    if cached is not None:
        return cached
    tensors, _ = decode_tensors(round_weights_bytes(rnd=rnd))
    state = {k: np.asarray(v) for k, v in tensors.items()}
    if len(_state_cache) > _CACHE_SIZE:
        _state_cache.clear()
    _state_cache[rnd.weights_sha256] = state
    return state


def round_trainable(*, rnd: FederatedRound) -> list[str]:
    """The parameters a round trains, in the program's order: what a delta carries."""
    names = version_trainable(version=rnd.base_version)
    if names is None:
        # A version without a program: every float tensor is a parameter.
        return sorted(k for k, v in round_state(rnd=rnd).items() if np.issubdtype(v.dtype, np.floating))
    return names


def round_weights(*, rnd: FederatedRound) -> Weights:
    """The round's trainable parameters, contiguous float32: what deltas are checked against."""
    cached = _weights_cache.get(rnd.weights_sha256)
    if cached is not None:
        return cached
    state = round_state(rnd=rnd)
    weights = {k: np.ascontiguousarray(state[k], dtype=np.float32) for k in round_trainable(rnd=rnd)}
    if len(_weights_cache) > _CACHE_SIZE:
        _weights_cache.clear()
    _weights_cache[rnd.weights_sha256] = weights
    return weights
