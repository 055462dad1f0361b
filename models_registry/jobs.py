"""Long-running registry work: evaluating, exporting and optimising versions, and building
their ONNX Runtime training artifacts.

Each piece of work is a :class:`~models_registry.models.ModelJob` row. ``job_enqueue``
creates the row and hands its id to Celery once the transaction commits; the task calls
``job_run``, which claims the row with a conditional update (a duplicate delivery finds
it taken and does nothing), does the work while appending to the row's log, and records
success or a clear failure. ML work runs outside database transactions: only the short
writes at the end take locks.

Optimised variants become new versions (``source=optimised``, ``parent`` = the version
they came from, ``variant`` = the kind) and are evaluated on the same data set as their
parent. A variant that loses more accuracy than allowed is kept for the record with
``metrics.rejected = true`` and the numbers, and like every new version starts in
``draft``: nothing here ever promotes a version.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import numpy as np
import numpy.typing as npt
from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from core.api import ServiceError
from core.audit.services import audit_record
from core.dispatch import enqueue_on_commit, send_now
from core.leases import Lease
from devices_agent.codecs import WireError, decode_tensors
from models_registry import datasets, selectors, services
from models_registry.models import (
    Artifact,
    EvaluationDataset,
    EvaluationReport,
    ModelJob,
    ModelVersion,
)

__all__ = [
    "OPTIMISE_KINDS",
    "TASKS",
    "job_claim",
    "job_enqueue",
    "job_run",
    "jobs_resume",
]

log = logging.getLogger(__name__)

OPTIMISE_KINDS = ("int8_dynamic", "int8_static", "fp16", "prune_unstructured", "prune_structured", "distil")
DEFAULT_MAX_ACCURACY_DROP = 0.01
_LOG_LIMIT = 20_000

# Parameters each kind accepts, with their types: anything else is refused up front
# rather than silently ignored.
_NUMBER = (int, float)
_PARAMS: dict[str, dict[str, tuple[type, ...]]] = {
    ModelJob.Kind.EVALUATE: {"dataset": (str,), "latency_repeats": (int,)},
    ModelJob.Kind.EXPORT: {"dataset": (str,), "opset": (int,), "atol": _NUMBER, "rtol": _NUMBER},
    ModelJob.Kind.OPTIMISE: {
        "kind": (str,),
        "dataset": (str,),
        "train_dataset": (str,),
        "max_accuracy_drop": _NUMBER,
        "latency_repeats": (int,),
        "per_channel": (bool,),
        "amount": _NUMBER,
        "finetune_epochs": (int,),
        "quantise": (bool,),
        "student_arch": (str,),
        "epochs": (int,),
        "temperature": _NUMBER,
        "alpha": _NUMBER,
        "lr": _NUMBER,
        "seed": (int,),
    },
    # Built from the version's own graph and program; nothing to choose.
    ModelJob.Kind.ORT_TRAINING: {},
}


# --------------------------------------------------------------------------- enqueue


def _check_params(kind: str, params: dict[str, Any], version: ModelVersion) -> dict[str, Any]:
    allowed = _PARAMS[kind]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ServiceError(
            f"Unknown parameters for {kind}: {unknown}.",
            code="invalid_params",
            details={"allowed": sorted(allowed)},
        )
    for key, value in params.items():
        types = allowed[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise ServiceError(f"Parameter {key} has the wrong type.", code="invalid_params")
    if kind == ModelJob.Kind.OPTIMISE:
        optimisation = params.get("kind")
        if optimisation not in OPTIMISE_KINDS:
            raise ServiceError(
                f"kind must be one of {', '.join(OPTIMISE_KINDS)}.",
                code="invalid_params",
                details={"kinds": list(OPTIMISE_KINDS)},
            )
        drop = params.get("max_accuracy_drop", DEFAULT_MAX_ACCURACY_DROP)
        if not 0 <= float(drop) <= 1:
            raise ServiceError("max_accuracy_drop must lie in [0, 1].", code="invalid_params")
        if "amount" in params and not 0 <= float(params["amount"]) < 1:
            raise ServiceError("amount must lie in [0, 1).", code="invalid_params")
        if (
            optimisation in ("prune_unstructured", "prune_structured", "distil")
            and not version.artifacts.filter(kind=Artifact.Kind.WEIGHTS).exists()
        ):
            raise ServiceError(f"{optimisation} needs the version's weights artifact.", code="no_weights")
    if kind == ModelJob.Kind.EXPORT and not version.artifacts.filter(kind=Artifact.Kind.WEIGHTS).exists():
        raise ServiceError("Export needs the version's weights artifact.", code="no_weights")
    if "latency_repeats" in params and not 1 <= int(params["latency_repeats"]) <= 10_000:
        raise ServiceError("latency_repeats must lie in [1, 10000].", code="invalid_params")
    return params


# The Celery task that runs each kind of job (all of them call ``job_run``).
TASKS: dict[str, str] = {
    ModelJob.Kind.EVALUATE: "models_registry.evaluate_version",
    ModelJob.Kind.EXPORT: "models_registry.export_version",
    ModelJob.Kind.OPTIMISE: "models_registry.optimise_version",
    ModelJob.Kind.ORT_TRAINING: "models_registry.build_ort_training",
}


def job_enqueue(
    *, kind: str, version: ModelVersion, params: dict[str, Any] | None = None, actor: Any = None
) -> ModelJob:
    """Create a queued job for ``version`` and start its task once the transaction commits.

    ``kind`` is ``evaluate``, ``export``, ``optimise`` (``params["kind"]`` then names
    the optimisation: one of :data:`OPTIMISE_KINDS`) or ``ort_training`` (see
    :mod:`models_registry.ort_training`). Bad parameters are a 400
    ``invalid_params``.
    """
    if kind not in ModelJob.Kind.values:
        raise ServiceError(f"Unknown job kind {kind!r}.", code="invalid_kind")
    checked = _check_params(kind, dict(params or {}), version)
    with transaction.atomic():
        job = ModelJob.objects.create(
            kind=kind,
            version=version,
            params=checked,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        audit_record(
            actor=actor, action=f"model_job.{kind}", target=job, data={"version": version.pk, **checked}
        )
        # The worker must find the row: the message leaves only after the commit. A lost
        # message leaves the job queued, and jobs_resume sends it again.
        enqueue_on_commit(TASKS[kind], job.pk)
    return job


# --------------------------------------------------------------------------- lifecycle


def _lease_s() -> float:
    # A job still "running" after the hard time limit belongs to a worker that died; the
    # broker redelivers its message (acks_late) and the new delivery may take it over.
    return float(int(getattr(settings, "CELERY_TASK_TIME_LIMIT", 660)) + 30)


LEASE = Lease(ModelJob, "lease_expires_at", _lease_s)
# A queued job this old was probably never delivered (a broker that lost its messages):
# jobs_resume sends it again. A duplicate is harmless, the claim lets one run through.
REDISPATCH_AFTER = timedelta(minutes=5)


def job_claim(*, job_id: int) -> bool:
    """Move the job from queued (or running past its lease) to running; False when someone has it."""
    now = timezone.now()
    token = LEASE.claim(
        job_id,
        where=Q(status__in=(ModelJob.Status.QUEUED, ModelJob.Status.RUNNING)),
        now=now,
        status=ModelJob.Status.RUNNING,
        started_at=now,
        attempts=F("attempts") + 1,
        progress=0.0,
    )
    return token is not None


def jobs_resume(*, now: Any = None) -> list[int]:
    """Periodic: send again the jobs whose message was lost; returns their ids.

    Queued jobs older than :data:`REDISPATCH_AFTER`, and running jobs whose lease expired
    (their worker died and no redelivery took them over).
    """
    now = now or timezone.now()
    due = ModelJob.objects.filter(
        Q(status=ModelJob.Status.QUEUED, created_at__lt=now - REDISPATCH_AFTER)
        | Q(status=ModelJob.Status.RUNNING) & LEASE.expired(now)
    ).values_list("pk", "kind")
    sent = []
    for job_id, kind in due:
        if send_now(TASKS[kind], job_id):
            sent.append(job_id)
    return sent


class _Progress:
    """Appends to the job's log and moves its progress bar, one short UPDATE per step."""

    def __init__(self, job: ModelJob) -> None:
        self.job = job
        self.lines: list[str] = [job.log] if job.log else []

    def __call__(self, message: str, progress: float | None = None) -> None:
        stamp = timezone.now().strftime("%H:%M:%S")
        self.lines.append(f"{stamp} {message}")
        text = "\n".join(self.lines)[-_LOG_LIMIT:]
        fields: dict[str, Any] = {"log": text}
        if progress is not None:
            fields["progress"] = progress
        ModelJob.objects.filter(pk=self.job.pk).update(**fields)
        self.job.log = text


def _jsonable(value: Any) -> Any:
    def fallback(item: Any) -> Any:
        if isinstance(item, np.generic):
            return item.item()
        if isinstance(item, np.ndarray):
            return item.tolist()
        return str(item)

    return json.loads(json.dumps(value, default=fallback))


def _finish(
    job: ModelJob, *, status: str, result: dict[str, Any], error: str = "", result_version: Any = None
) -> None:
    ModelJob.objects.filter(pk=job.pk).update(
        status=status,
        result=_jsonable(result),
        error=error,
        result_version=result_version,
        progress=1.0 if status == ModelJob.Status.SUCCEEDED else F("progress"),
        finished_at=timezone.now(),
        lease_expires_at=None,
    )


def job_run(*, job_id: int) -> str:
    """Run job ``job_id`` if it can be claimed; return its final status (or ``skipped``).

    Every failure ends in ``failed`` with a readable ``error``; nothing is raised to the
    caller, so a task never retries work that failed for a reason retrying cannot fix.
    """
    if not job_claim(job_id=job_id):
        return "skipped"
    job = ModelJob.objects.select_related("version", "version__family").get(pk=job_id)
    progress = _Progress(job)
    runners: dict[str, Callable[[ModelJob, _Progress], tuple[dict[str, Any], ModelVersion | None]]] = {
        ModelJob.Kind.EVALUATE: _run_evaluate,
        ModelJob.Kind.EXPORT: _run_export,
        ModelJob.Kind.OPTIMISE: _run_optimise,
        ModelJob.Kind.ORT_TRAINING: _run_ort_training,
    }
    try:
        progress(f"{job.kind} of {job.version.label} started (attempt {job.attempts + 1})", 0.0)
        result, result_version = runners[job.kind](job, progress)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the row
        message = _failure_message(exc)
        progress(f"failed: {message}")
        if not isinstance(exc, ServiceError | ValueError):
            log.exception("model job %s crashed", job_id)
            progress(traceback.format_exc(limit=5))
        details = getattr(exc, "details", None) or {}
        for attr in ("max_abs_diff", "atol", "rtol"):
            if hasattr(exc, attr):
                details[attr] = getattr(exc, attr)
        _finish(
            job,
            status=ModelJob.Status.FAILED,
            result={"error_type": type(exc).__name__, **details},
            error=message,
        )
        return ModelJob.Status.FAILED
    progress("succeeded", 1.0)
    _finish(job, status=ModelJob.Status.SUCCEEDED, result=result, result_version=result_version)
    return ModelJob.Status.SUCCEEDED


def _run_ort_training(job: ModelJob, progress: _Progress) -> tuple[dict[str, Any], ModelVersion | None]:
    from models_registry.ort_training import ort_training_build

    return ort_training_build(version=job.version, log=progress), None


def _failure_message(exc: Exception) -> str:
    if isinstance(exc, ServiceError):
        return exc.message
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------- inputs


def _read(artifact: Artifact) -> bytes:
    with default_storage.open(artifact.file.name, "rb") as handle:
        data: bytes = handle.read()
    import hashlib

    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise ServiceError(
            f"Stored {artifact.kind} artifact of {artifact.version_id} does not match its digest."
        )
    return data


def _weights(version: ModelVersion) -> dict[str, npt.NDArray[np.float32]] | None:
    artifact = selectors.artifact_for_version(version.pk, Artifact.Kind.WEIGHTS)
    if artifact is None:
        return None
    try:
        tensors, _ = decode_tensors(_read(artifact))
    except WireError as exc:
        raise ServiceError(f"The weights of {version.label} are unreadable: {exc}") from None
    return {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items()}


def _sample_inputs(version: ModelVersion) -> npt.NDArray[np.float32]:
    shape = [int(d) for d in version.family.input_shape or []]
    return np.random.default_rng(0).random((64, *shape), dtype=np.float32)


def _export(
    *,
    arch: str,
    weights: dict[str, npt.NDArray[np.float32]],
    sample: npt.NDArray[np.float32],
    opset: int,
    atol: float,
    rtol: float,
) -> Any:
    from models_registry.ml.export import export_onnx

    return export_onnx(arch=arch, weights=weights, sample_inputs=sample, opset=opset, atol=atol, rtol=rtol)


def _onnx_of(version: ModelVersion, progress: _Progress) -> bytes:
    artifact = selectors.artifact_for_version(version.pk, Artifact.Kind.ONNX)
    if artifact is not None:
        return _read(artifact)
    weights = _weights(version)
    if weights is None:
        raise ServiceError(f"{version.label} has neither an ONNX model nor weights.", code="no_artifacts")
    progress(f"{version.label} has no ONNX artifact: exporting its weights in memory")
    exported = _export(
        arch=version.effective_arch,
        weights=weights,
        sample=_sample_inputs(version),
        opset=17,
        atol=1e-4,
        rtol=1e-3,
    )
    return bytes(exported.onnx_bytes)


def _dataset(version: ModelVersion, name: str | None, *, split: str) -> EvaluationDataset:
    default = datasets.DIGITS_TEST if split == EvaluationDataset.Split.TEST else datasets.DIGITS_TRAIN
    wanted = name or default
    dataset = datasets.dataset_get(wanted)
    if dataset is None and wanted == datasets.DIGITS_TEST:
        dataset = datasets.dataset_register_digits_test()
    elif dataset is None and wanted == datasets.DIGITS_TRAIN:
        dataset = datasets.dataset_register_digits_train()
    if dataset is None:
        raise ServiceError(f"No data set named {wanted!r} is registered.", code="no_dataset")
    if dataset.split != split:
        raise ServiceError(
            f"Data set {dataset.name} is a {dataset.split} set; this step needs a {split} set."
        )
    family = version.family
    if list(dataset.input_shape) != list(family.input_shape) or dataset.num_classes != family.num_classes:
        raise ServiceError(
            f"Data set {dataset.name} has examples of shape {dataset.input_shape} and "
            f"{dataset.num_classes} classes; family {family.name} expects shape {family.input_shape} "
            f"and {family.num_classes} classes.",
            code="dataset_mismatch",
        )
    return dataset


# --------------------------------------------------------------------------- evaluate


def _evaluate(
    version: ModelVersion, dataset: EvaluationDataset, *, latency_repeats: int, progress: _Progress
) -> tuple[EvaluationReport, dict[str, Any]]:
    from models_registry.evaluation import version_evaluate

    onnx_bytes = _onnx_of(version, progress)
    progress(f"evaluating {version.label} on {dataset.name} ({dataset.num_examples} examples)")
    evaluation = version_evaluate(
        version=version, dataset=dataset, latency_repeats=latency_repeats, onnx_bytes=onnx_bytes
    )
    headline = evaluation.headline
    progress(
        f"accuracy {headline['accuracy']:.4f}, size {headline['size_bytes']} bytes, "
        f"p50 batch-1 {headline['p50_batch1_us']:.1f} us"
    )
    return evaluation.report, headline


def _run_evaluate(job: ModelJob, progress: _Progress) -> tuple[dict[str, Any], ModelVersion | None]:
    params = job.params
    dataset = _dataset(job.version, params.get("dataset"), split=EvaluationDataset.Split.TEST)
    report, headline = _evaluate(
        job.version, dataset, latency_repeats=int(params.get("latency_repeats", 200)), progress=progress
    )
    return {"report_id": report.pk, **headline}, None


# --------------------------------------------------------------------------- export


def _run_export(job: ModelJob, progress: _Progress) -> tuple[dict[str, Any], ModelVersion | None]:
    version, params = job.version, job.params
    weights = _weights(version)
    if weights is None:
        raise ServiceError(f"{version.label} has no weights artifact to export.", code="no_weights")
    sample = _sample_inputs(version)
    try:
        dataset = _dataset(version, params.get("dataset"), split=EvaluationDataset.Split.TEST)
        sample = datasets.dataset_load(dataset)[0][:64]
    except ServiceError as exc:
        if params.get("dataset"):
            raise
        progress(f"no matching data set for the parity check ({exc.message}); using random inputs")
    opset, atol, rtol = (
        int(params.get("opset", 17)),
        float(params.get("atol", 1e-4)),
        float(params.get("rtol", 1e-3)),
    )
    progress(f"exporting {version.effective_arch} to ONNX opset {opset}", 0.2)
    exported = _export(
        arch=version.effective_arch, weights=weights, sample=sample, opset=opset, atol=atol, rtol=rtol
    )
    progress(f"parity with torch on {len(sample)} inputs: max |diff| {exported.max_abs_diff:.3g}", 0.7)
    result: dict[str, Any] = {
        "opset": exported.opset,
        "max_abs_diff": exported.max_abs_diff,
        "parity_ok": exported.parity_ok,
        "exporter": exported.exporter,
        "atol": atol,
        "rtol": rtol,
    }
    existing = selectors.artifact_for_version(version.pk, Artifact.Kind.ONNX)
    if existing is not None:
        progress("the version already has an ONNX artifact; it is kept (artifacts never change)")
        return {**result, "onnx_sha256": existing.sha256, "attached": False}, None
    artifact = services.artifact_add(
        version=version, kind=Artifact.Kind.ONNX, data=exported.onnx_bytes, opset=exported.opset
    )
    return {**result, "onnx_sha256": artifact.sha256, "attached": True}, None


# --------------------------------------------------------------------------- optimise


def _make_variant(
    kind: str,
    *,
    version: ModelVersion,
    params: dict[str, Any],
    onnx_bytes: bytes,
    train: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
    max_drop: float,
) -> Any:
    from models_registry.ml import optimise

    x_train, y_train = train
    seed = int(params.get("seed", 0))
    if kind == "int8_dynamic":
        return optimise.quantize_dynamic_int8(onnx_bytes, per_channel=bool(params.get("per_channel", True)))
    if kind == "int8_static":
        return optimise.quantize_static_int8(
            onnx_bytes,
            x_train,
            calibration_y=y_train,
            max_accuracy_drop=max_drop,
            latency_repeats=int(params.get("latency_repeats", 40)),
        )
    if kind == "fp16":
        return optimise.convert_fp16(onnx_bytes)
    weights = _weights(version)
    if weights is None:
        raise ServiceError(f"{kind} needs the weights of {version.label}.", code="no_weights")
    if kind in ("prune_unstructured", "prune_structured"):
        pruned = optimise.prune_magnitude(
            arch=version.effective_arch,
            weights=weights,
            x=x_train,
            y=y_train,
            amount=float(params.get("amount", 0.5)),
            structured=kind == "prune_structured",
            finetune_epochs=int(params.get("finetune_epochs", 5)),
            lr=float(params.get("lr", 0.005)),
            seed=seed,
        )
        return pruned.int8 if params.get("quantise") else pruned.fp32
    return optimise.distil(
        teacher_arch=version.effective_arch,
        teacher_weights=weights,
        student_arch=str(params.get("student_arch", "mlp_small")),
        x=x_train,
        y=y_train,
        epochs=int(params.get("epochs", 30)),
        temperature=float(params.get("temperature", 4.0)),
        alpha=float(params.get("alpha", 0.7)),
        lr=float(params.get("lr", 0.01)),
        seed=seed,
    )


def _run_optimise(job: ModelJob, progress: _Progress) -> tuple[dict[str, Any], ModelVersion | None]:
    version, params = job.version, job.params
    kind = str(params["kind"])
    max_drop = float(
        params.get("max_accuracy_drop", getattr(settings, "MODEL_OPTIMISE_MAX_ACCURACY_DROP", 0.01))
    )
    repeats = int(params.get("latency_repeats", 100))
    test_set = _dataset(version, params.get("dataset"), split=EvaluationDataset.Split.TEST)
    train_set = _dataset(version, params.get("train_dataset"), split=EvaluationDataset.Split.TRAIN)

    if version.metrics.get("dataset") != test_set.name or "accuracy" not in version.metrics:
        progress(f"evaluating the parent {version.label} first, for the accuracy to compare with", 0.05)
        _evaluate(version, test_set, latency_repeats=repeats, progress=progress)
    parent_accuracy = float(version.metrics["accuracy"])

    # A redelivered job finds the version it created before the crash instead of making
    # a second one.
    derived = (
        ModelVersion.objects.filter(
            parent=version, source=ModelVersion.Source.OPTIMISED, source_detail__job=job.pk
        )
        .select_related("family")
        .first()
    )
    if derived is None:
        progress(f"building the {kind} variant", 0.2)
        variant = _make_variant(
            kind,
            version=version,
            params=params,
            onnx_bytes=_onnx_of(version, progress),
            train=datasets.dataset_load(train_set),
            max_drop=max_drop,
        )
        progress(f"{variant.description}: {variant.size_bytes} bytes", 0.6)
        arch = variant.arch or version.arch
        derived = services.version_create(
            family=version.family,
            weights=variant.weights_safetensors,
            onnx=variant.onnx_bytes,
            parent=version,
            source=ModelVersion.Source.OPTIMISED,
            source_detail=_jsonable(
                {
                    "job": job.pk,
                    "optimisation": kind,
                    "description": variant.description,
                    "train_dataset": train_set.name,
                    "details": variant.details,
                }
            ),
            variant=variant.name,
            arch="" if arch == version.family.arch else arch,
            notes=f"{variant.description} (from {version.label}, job {job.pk}).",
            actor=job.created_by,
        )
        progress(f"registered {derived.label} ({derived.variant}, draft)", 0.7)
    _, headline = _evaluate(derived, test_set, latency_repeats=repeats, progress=progress)
    drop = parent_accuracy - float(headline["accuracy"])
    rejected = drop > max_drop + 1e-12
    verdict: dict[str, Any] = {
        "rejected": rejected,
        "parent_accuracy": parent_accuracy,
        "accuracy_drop": drop,
        "max_accuracy_drop": max_drop,
    }
    if rejected:
        verdict["rejection_reason"] = (
            f"accuracy {headline['accuracy']:.4f} is {drop:.4f} below the parent's {parent_accuracy:.4f}; "
            f"at most {max_drop:.4f} is allowed"
        )
        progress(f"rejected: {verdict['rejection_reason']}")
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=derived.pk)
        locked.metrics = {**locked.metrics, **verdict}
        locked.save(update_fields=["metrics"])
    return {
        "version_id": derived.pk,
        "label": derived.label,
        "variant": derived.variant,
        "accuracy": headline["accuracy"],
        "size_bytes": headline["size_bytes"],
        "p50_batch1_us": headline["p50_batch1_us"],
        **verdict,
    }, derived
