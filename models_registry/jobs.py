"""Long-running registry work: evaluating, exporting and optimising versions, and building
their ONNX Runtime training artifacts.

Each piece of work is a :class:`~models_registry.models.ModelJob` row. ``job_enqueue``
checks the parameters and what the work needs (weights, a program, the family's data
sets), creates the row and hands its id to Celery once the transaction commits; the task
calls ``job_run``, which claims the row with a conditional update (a duplicate delivery
finds it taken and does nothing), does the work while appending to the row's log, and
records success or a clear failure. ML work runs outside database transactions: only
the short writes at the end take locks.

- ``evaluate``: the version on its family's newest test set (or the one named), through
  :func:`models_registry.evaluation.version_evaluate`. A family without a test set is
  evaluated on the boards instead (federated evaluation): 400 ``no_dataset``.
- ``export``: a version with weights and a program but no ONNX graph gets one, its
  weights written into the nearest ancestor's graph and checked against the program
  (:func:`models_registry.evaluation.graph_from_ancestor`).
- ``optimise``: a variant (:data:`OPTIMISE_KINDS`) becomes a new version
  (``source=optimised``, ``parent`` = the version it came from, ``variant`` = the kind)
  and is evaluated on the same test set as its parent. Quality is the family's primary
  metric (accuracy, or mae for regression); a variant more than ``max_metric_drop``
  (alias ``max_accuracy_drop``) worse than its parent is kept for the record with
  ``metrics.rejected = true`` and the numbers, and like every new version starts in
  ``draft``: nothing here ever promotes a version.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import F, Q
from django.utils import timezone

from core.api import ConflictError, ServiceError
from core.audit.services import audit_record
from core.dispatch import enqueue_on_commit, send_now
from core.leases import Lease
from models_registry import datasets, selectors, services
from models_registry.evaluation import (
    evaluation_dataset,
    graph_from_ancestor,
    jsonable,
    no_test_set,
    version_evaluate,
    version_graph,
    version_state,
)
from models_registry.models import (
    Artifact,
    EvaluationDataset,
    EvaluationReport,
    ModelJob,
    ModelVersion,
)
from models_registry.ort_training import (
    NOT_TRAINABLE,
    PENDING,
    READY,
    graph_chain,
    graph_root,
    ort_training_status,
    status_record,
)

__all__ = [
    "OPTIMISE_KINDS",
    "TASKS",
    "job_claim",
    "job_enqueue",
    "job_run",
    "jobs_redrive",
]

log = logging.getLogger(__name__)

OPTIMISE_KINDS = ("int8_dynamic", "int8_static", "fp16", "prune_unstructured", "prune_structured", "distil")
# Kinds that train or calibrate on the family's train set.
_NEEDS_TRAIN = ("int8_static", "prune_unstructured", "distil")
DEFAULT_MAX_METRIC_DROP = 0.01
_LOG_LIMIT = 20_000

# Parameters each kind accepts, with their types: anything else is refused up front
# rather than silently ignored.
_NUMBER = (int, float)
_PARAMS: dict[str, dict[str, tuple[type, ...]]] = {
    ModelJob.Kind.EVALUATE: {"dataset": (str,), "latency_repeats": (int,)},
    ModelJob.Kind.EXPORT: {"atol": _NUMBER, "rtol": _NUMBER},
    ModelJob.Kind.OPTIMISE: {
        "kind": (str,),
        "dataset": (str,),
        "train_dataset": (str,),
        "max_metric_drop": _NUMBER,
        "max_accuracy_drop": _NUMBER,
        "latency_repeats": (int,),
        "per_channel": (bool,),
        "amount": _NUMBER,
        "finetune_epochs": (int,),
        "quantise": (bool,),
        "student_version": (int,),
        "epochs": (int,),
        "batch_size": (int,),
        "temperature": _NUMBER,
        "alpha": _NUMBER,
        "lr": _NUMBER,
        "seed": (int,),
    },
    # Built from the version's own graph and program; nothing to choose.
    ModelJob.Kind.ORT_TRAINING: {},
}


# --------------------------------------------------------------------------- enqueue


def _invalid(message: str, **details: Any) -> ServiceError:
    return ServiceError(message, code="invalid_params", details=details)


def max_metric_drop(params: dict[str, Any]) -> float:
    """The allowed worsening of the primary metric: ``max_metric_drop`` or its alias ``max_accuracy_drop``."""
    for key in ("max_metric_drop", "max_accuracy_drop"):
        if key in params:
            return float(params[key])
    return float(getattr(settings, "MODEL_OPTIMISE_MAX_ACCURACY_DROP", DEFAULT_MAX_METRIC_DROP))


def _has(version: ModelVersion, kind: str) -> bool:
    return version.artifacts.filter(kind=kind).exists()


def _needs_program(version: ModelVersion, what: str) -> None:
    if not _has(version, Artifact.Kind.WEIGHTS):
        raise ServiceError(f"{what} needs the weights of {version.label}.", code="no_weights")
    if not _has(version, Artifact.Kind.PROGRAM):
        raise ServiceError(
            f"{what} trains or rebuilds {version.label} from its program, and it has none "
            "(versions made by quantisation or fp16 keep only their graph).",
            code="no_program",
        )


def _test_set(version: ModelVersion, name: str | None) -> EvaluationDataset:
    dataset = evaluation_dataset(family=version.family, name=name)
    if dataset is None:
        raise no_test_set(version.family)
    return dataset


def _train_set(version: ModelVersion, name: str | None, kind: str) -> EvaluationDataset:
    family = version.family
    dataset = datasets.family_dataset(family=family, split=EvaluationDataset.Split.TRAIN, name=name)
    if dataset is None:
        raise ServiceError(
            f"{kind} calibrates or trains on the family's training data, and family {family.name} has no "
            "train data set; register one with split=train (POST /api/v1/datasets/).",
            code="no_dataset",
            details={"family": family.pk, "split": "train"},
        )
    return dataset


def _student(version: ModelVersion, params: dict[str, Any]) -> ModelVersion:
    if "student_version" not in params:
        raise ServiceError(
            "distil needs student_version: the id of a version of the same family whose program "
            "(a smaller model, say) the teacher is distilled into.",
            code="no_student",
        )
    student = ModelVersion.objects.select_related("family").filter(pk=params["student_version"]).first()
    if student is None:
        raise ServiceError(f"No version {params['student_version']} to distil into.", code="invalid_student")
    if student.family_id != version.family_id:
        raise ServiceError(
            f"The student {student.label} belongs to another family than {version.label}.",
            code="invalid_student",
        )
    missing = [k for k in (Artifact.Kind.PROGRAM, Artifact.Kind.WEIGHTS) if not _has(student, k)]
    if missing:
        raise ServiceError(
            f"The student {student.label} lacks its {' and '.join(missing)}; "
            "distillation trains its program.",
            code="invalid_student",
        )
    return student


def _check_params(kind: str, params: dict[str, Any], version: ModelVersion) -> dict[str, Any]:
    allowed = _PARAMS[kind]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise _invalid(f"Unknown parameters for {kind}: {unknown}.", allowed=sorted(allowed))
    for key, value in params.items():
        types = allowed[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            raise _invalid(f"Parameter {key} has the wrong type.")
    if "latency_repeats" in params and not 1 <= int(params["latency_repeats"]) <= 10_000:
        raise _invalid("latency_repeats must lie in [1, 10000].")
    if kind == ModelJob.Kind.EVALUATE:
        _test_set(version, params.get("dataset"))
    elif kind == ModelJob.Kind.EXPORT:
        _needs_program(version, "Export")
        for key in ("atol", "rtol"):
            if key in params and not 0 <= float(params[key]) <= 1:
                raise _invalid(f"{key} must lie in [0, 1].")
    elif kind == ModelJob.Kind.OPTIMISE:
        _check_optimise(params, version)
    return params


def _check_optimise(params: dict[str, Any], version: ModelVersion) -> None:
    optimisation = params.get("kind")
    if optimisation not in OPTIMISE_KINDS:
        raise _invalid(f"kind must be one of {', '.join(OPTIMISE_KINDS)}.", kinds=list(OPTIMISE_KINDS))
    if optimisation == "prune_structured":
        raise ServiceError(
            "prune_structured removes neurons or channels, which changes layer widths; a version's program "
            "fixes every shape, so the registry cannot derive a narrower model from it. Use "
            "prune_unstructured, or distil into a smaller student version you upload.",
            code="not_supported",
        )
    drops = {k: float(params[k]) for k in ("max_metric_drop", "max_accuracy_drop") if k in params}
    if len(set(drops.values())) > 1:
        raise _invalid("max_metric_drop and its alias max_accuracy_drop disagree; give one.")
    drop = max_metric_drop(params)
    spec = version.family.spec
    if drop < 0 or (spec.higher_is_better and drop > 1):
        bound = "[0, 1]" if spec.higher_is_better else "[0, inf)"
        raise _invalid(
            f"max_metric_drop (the allowed worsening of {spec.primary_metric}) must lie in {bound}."
        )
    if "amount" in params and not 0 <= float(params["amount"]) < 1:
        raise _invalid("amount must lie in [0, 1).")
    for key, low in (("epochs", 1), ("finetune_epochs", 0), ("batch_size", 1)):
        if key in params and not low <= int(params[key]) <= 10_000:
            raise _invalid(f"{key} must lie in [{low}, 10000].")
    if "temperature" in params and not float(params["temperature"]) > 0:
        raise _invalid("temperature must be positive.")
    if "alpha" in params and not 0 <= float(params["alpha"]) <= 1:
        raise _invalid("alpha must lie in [0, 1].")
    if "lr" in params and not 0 < float(params["lr"]) <= 10:
        raise _invalid("lr must lie in (0, 10].")
    if optimisation == "prune_unstructured":
        _needs_program(version, "prune_unstructured")
    if optimisation == "distil":
        _student(version, params)
    elif "student_version" in params:
        raise _invalid("student_version applies to distil only.")
    if not _has(version, Artifact.Kind.ONNX) and not _has(version, Artifact.Kind.PROGRAM):
        raise ServiceError(f"{version.label} has no ONNX graph to optimise.", code="no_artifacts")
    _test_set(version, params.get("dataset"))
    if optimisation in _NEEDS_TRAIN:
        _train_set(version, params.get("train_dataset"), str(optimisation))


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
    :mod:`models_registry.ort_training`). Refused with a 400: bad parameters
    (``invalid_params``), an optimisation the registry cannot express
    (``not_supported``), missing weights or program (``no_weights``, ``no_program``),
    a missing or unfitting data set (``no_dataset``, ``wrong_split``,
    ``dataset_mismatch``), a missing or unfit distillation student (``no_student``,
    ``invalid_student``).
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
        # message leaves the job queued, and the sweep (jobs_redrive) sends it again.
        enqueue_on_commit(TASKS[kind], job.pk)
    return job


# --------------------------------------------------------------------------- lifecycle


def _lease_s() -> float:
    # A job still "running" after the hard time limit belongs to a worker that died; the
    # broker redelivers its message (acks_late) and the new delivery may take it over.
    return float(int(getattr(settings, "CELERY_TASK_TIME_LIMIT", 660)) + 30)


LEASE = Lease(ModelJob, "lease_expires_at", _lease_s)


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


def jobs_redrive(*, now: datetime, grace: timedelta) -> list[int]:
    """The sweep's re-drive of model jobs (``core.sweep``): send their task again; their ids.

    Jobs ``queued`` for longer than ``grace`` (their message was probably lost: a broker
    that lost its data), and jobs ``running`` past their lease (their worker died and no
    redelivery took them over). A job under a live lease is never re-sent, and a job is
    re-sent at most once per ``grace`` (``redriven_at``); a duplicate of a queued job is
    harmless, the claim lets one delivery run it.
    """
    lost = Q(status=ModelJob.Status.QUEUED, created_at__lt=now - grace)
    dead = Q(status=ModelJob.Status.RUNNING) & LEASE.expired(now)
    # A job waiting behind busy workers is sent again at most once per grace.
    not_lately = Q(redriven_at__isnull=True) | Q(redriven_at__lt=now - grace)
    due = ModelJob.objects.filter((lost | dead) & not_lately).values_list("pk", "kind")
    sent = [job_id for job_id, kind in due.order_by("pk") if send_now(TASKS[kind], job_id)]
    ModelJob.objects.filter(pk__in=sent).update(redriven_at=now)
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


def _finish(
    job: ModelJob, *, status: str, result: dict[str, Any], error: str = "", result_version: Any = None
) -> None:
    ModelJob.objects.filter(pk=job.pk).update(
        status=status,
        result=jsonable(result),
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
            result={
                "error_type": type(exc).__name__,
                **({"code": exc.code} if isinstance(exc, ServiceError) else {}),
                **details,
            },
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


# --------------------------------------------------------------------------- evaluate


def _evaluate(
    version: ModelVersion, dataset: EvaluationDataset, *, latency_repeats: int, progress: _Progress
) -> tuple[EvaluationReport, dict[str, Any]]:
    progress(f"evaluating {version.label} on {dataset.name} ({dataset.num_examples} examples)")
    evaluation = version_evaluate(version=version, dataset=dataset, latency_repeats=latency_repeats)
    headline = evaluation.headline
    metric = version.family.spec.primary_metric
    progress(
        f"{metric} {headline[metric]:.4f}, size {headline['size_bytes']} bytes, "
        f"p50 batch-1 {headline['p50_batch1_us']:.1f} us"
    )
    return evaluation.report, headline


def _run_evaluate(job: ModelJob, progress: _Progress) -> tuple[dict[str, Any], ModelVersion | None]:
    params = job.params
    dataset = _test_set(job.version, params.get("dataset"))
    report, headline = _evaluate(
        job.version, dataset, latency_repeats=int(params.get("latency_repeats", 200)), progress=progress
    )
    return {"report_id": report.pk, **headline}, None


# --------------------------------------------------------------------------- export


def _run_export(job: ModelJob, progress: _Progress) -> tuple[dict[str, Any], ModelVersion | None]:
    version, params = job.version, job.params
    existing = selectors.artifact_for_version(version.pk, Artifact.Kind.ONNX)
    if existing is not None:
        progress("the version already has an ONNX artifact; it is kept (artifacts never change)")
        return {"onnx_sha256": existing.sha256, "attached": False}, None
    atol, rtol = float(params.get("atol", 1e-4)), float(params.get("rtol", 1e-3))
    progress(f"writing the weights of {version.label} into its nearest ancestor's ONNX graph", 0.2)
    made = graph_from_ancestor(version, atol=atol, rtol=rtol)
    progress(
        f"the graph of {made.ancestor.label} with these weights matches the program on sample inputs: "
        f"max |diff| {made.max_abs_diff:.3g}",
        0.7,
    )
    result: dict[str, Any] = {
        "ancestor": made.ancestor.pk,
        "ancestor_label": made.ancestor.label,
        "max_abs_diff": made.max_abs_diff,
        "parity_ok": True,
        "atol": atol,
        "rtol": rtol,
    }
    try:
        artifact = services.artifact_add(version=version, kind=Artifact.Kind.ONNX, data=made.onnx)
    except ConflictError:
        # Attached meanwhile by another delivery of the same job: that one is kept.
        existing = selectors.artifact_for_version(version.pk, Artifact.Kind.ONNX)
        assert existing is not None
        return {**result, "onnx_sha256": existing.sha256, "attached": False}, None
    return {**result, "onnx_sha256": artifact.sha256, "opset": artifact.opset, "attached": True}, None


# --------------------------------------------------------------------------- optimise


def _program_of(version: ModelVersion) -> bytes:
    program = selectors.version_program(version=version)
    if program is None:
        raise ServiceError(f"{version.label} has no program.", code="no_program")
    return program


def _state_of(version: ModelVersion) -> dict[str, Any]:
    state = version_state(version)
    if state is None:
        raise ServiceError(f"{version.label} has no weights.", code="no_weights")
    return state


def _make_variant(
    kind: str,
    *,
    version: ModelVersion,
    params: dict[str, Any],
    train: tuple[Any, Any] | None,
    max_drop: float,
    progress: _Progress,
) -> Any:
    from models_registry.ml import optimise

    spec = version.family.spec
    seed = int(params.get("seed", 0))
    graph = version_graph(version)
    if kind == "int8_dynamic":
        return optimise.quantize_dynamic_int8(graph, per_channel=bool(params.get("per_channel", True)))
    if kind == "fp16":
        return optimise.convert_fp16(graph)
    assert train is not None
    x_train, y_train = train
    if kind == "int8_static":
        return optimise.quantize_static_int8(
            graph,
            x_train,
            calibration_y=y_train,
            spec=spec,
            max_metric_drop=max_drop,
            latency_repeats=int(params.get("latency_repeats", 40)),
        )
    if kind == "prune_unstructured":
        return optimise.prune_unstructured(
            program=_program_of(version),
            state=_state_of(version),
            onnx_bytes=graph,
            spec=spec,
            x=x_train,
            y=y_train,
            amount=float(params.get("amount", 0.5)),
            finetune_epochs=int(params.get("finetune_epochs", 5)),
            lr=float(params.get("lr", 0.005)),
            seed=seed,
            batch_size=int(params.get("batch_size", 32)),
            quantise=bool(params.get("quantise", False)),
        )
    if kind == "distil":
        student = _student(version, params)
        progress(f"distilling {version.label} into the program of {student.label}")
        return optimise.distil(
            teacher_onnx=graph,
            student_program=_program_of(student),
            student_state=_state_of(student),
            student_onnx=version_graph(student),
            spec=spec,
            x=x_train,
            y=y_train,
            epochs=int(params.get("epochs", 30)),
            temperature=float(params.get("temperature", 4.0)),
            alpha=float(params.get("alpha", 0.7)),
            lr=float(params.get("lr", 0.01)),
            seed=seed,
            batch_size=int(params.get("batch_size", 32)),
        )
    raise ServiceError(f"{kind} is not an optimisation the registry can run.", code="not_supported")


def _verdict(*, metric: str, higher: bool, parent: float, value: float, max_drop: float) -> dict[str, Any]:
    from models_registry.ml.optimise import metric_drop

    drop = metric_drop(parent, value, higher_is_better=higher)
    rejected = drop > max_drop + 1e-12
    verdict: dict[str, Any] = {
        "rejected": rejected,
        "metric": metric,
        "parent_metric": parent,
        "metric_drop": drop,
        "max_metric_drop": max_drop,
    }
    if metric == "accuracy":
        # The names of the classification-only days, kept for the clients that read them.
        verdict.update({"parent_accuracy": parent, "accuracy_drop": drop, "max_accuracy_drop": max_drop})
    if rejected:
        side = "below" if higher else "above"
        verdict["rejection_reason"] = (
            f"{metric} {value:.4f} is {drop:.4f} {side} the parent's {parent:.4f}; "
            f"at most {max_drop:.4f} worse is allowed"
        )
    return verdict


def _run_optimise(job: ModelJob, progress: _Progress) -> tuple[dict[str, Any], ModelVersion | None]:
    version, params = job.version, job.params
    kind = str(params["kind"])
    spec = version.family.spec
    metric = spec.primary_metric
    max_drop = max_metric_drop(params)
    repeats = int(params.get("latency_repeats", 100))
    if kind == "prune_structured":
        _check_optimise(params, version)  # raises not_supported
    test_set = _test_set(version, params.get("dataset"))
    train_set = _train_set(version, params.get("train_dataset"), kind) if kind in _NEEDS_TRAIN else None

    if version.metrics.get("dataset") != test_set.name or metric not in version.metrics:
        progress(f"evaluating the parent {version.label} first, for the {metric} to compare with", 0.05)
        _evaluate(version, test_set, latency_repeats=repeats, progress=progress)
    parent_value = float(version.metrics[metric])

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
            train=datasets.dataset_load(train_set) if train_set is not None else None,
            max_drop=max_drop,
            progress=progress,
        )
        progress(f"{variant.description}: {variant.size_bytes} bytes", 0.6)
        student = _student(version, params) if kind == "distil" else None
        source = student or version
        arch = source.arch
        derived = services.version_create(
            family=version.family,
            weights=variant.weights_safetensors,
            onnx=variant.onnx_bytes,
            program=variant.program,
            head=list(source.head or []) if variant.program is not None else None,
            parent=version,
            source=ModelVersion.Source.OPTIMISED,
            source_detail=jsonable(
                {
                    "job": job.pk,
                    "optimisation": kind,
                    "description": variant.description,
                    "train_dataset": train_set.name if train_set is not None else None,
                    "student_version": student.pk if student is not None else None,
                    "details": variant.details,
                }
            ),
            variant=variant.name,
            arch="" if arch == version.family.arch else arch,
            notes=f"{variant.description} (from {version.label}, job {job.pk}).",
            actor=job.created_by,
            # Trained variants are their parent's (or student's) checked graph with new
            # weights written in by name: the tensors are checked, the graph is not run again.
            derived=variant.program is not None,
        )
        progress(f"registered {derived.label} ({derived.variant}, draft)", 0.7)
    _, headline = _evaluate(derived, test_set, latency_repeats=repeats, progress=progress)
    verdict = _verdict(
        metric=metric,
        higher=spec.higher_is_better,
        parent=parent_value,
        value=float(headline[metric]),
        max_drop=max_drop,
    )
    if verdict["rejected"]:
        progress(f"rejected: {verdict['rejection_reason']}")
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=derived.pk)
        locked.metrics = {**locked.metrics, **verdict}
        locked.save(update_fields=["metrics"])
    return {
        "version_id": derived.pk,
        "label": derived.label,
        "variant": derived.variant,
        metric: headline[metric],
        "size_bytes": headline["size_bytes"],
        "p50_batch1_us": headline["p50_batch1_us"],
        **verdict,
    }, derived


def ort_training_request(*, version: ModelVersion, actor: Any = None) -> ModelJob | None:
    """Queue the build of the version's ORT training artifacts unless it is done or under way.

    For a federated version the build is of the version its graph comes from. Returns the
    queued (or running) job, or None when the artifacts exist or the graph is known not
    to be trainable. A version without a program and an ONNX graph is a 400 ``no_program``.
    """
    root = graph_root(version)
    kinds = set(root.artifacts.values_list("kind", flat=True))
    if not {Artifact.Kind.PROGRAM, Artifact.Kind.ONNX} <= kinds:
        raise ServiceError(
            f"{root.label} has no program and ONNX graph to build training artifacts from.", code="no_program"
        )
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().get(pk=root.pk)
        status = ort_training_status(locked)
        chain = graph_chain(version, root)
        if status in (READY, NOT_TRAINABLE):
            status_record(root_id=root.pk, record=dict(locked.ort_training), also=chain)
            return None
        running = ModelJob.objects.filter(
            version=root,
            kind=ModelJob.Kind.ORT_TRAINING,
            status__in=(ModelJob.Status.QUEUED, ModelJob.Status.RUNNING),
        ).first()
        if running is not None:
            status_record(root_id=root.pk, record={"status": PENDING, "job": running.pk}, also=chain)
            return running
        job = job_enqueue(kind=ModelJob.Kind.ORT_TRAINING, version=root, actor=actor)
        status_record(root_id=root.pk, record={"status": PENDING, "job": job.pk}, also=chain)
    return job
