"""Writes of the model registry: families, versions with their artifacts, stage changes.

Artifacts are stored through Django's storage API under content-addressed names
(``artifacts/<aa>/<sha256>.<ext>``), so the same bytes are stored once and a name never
changes meaning. A version and its artifacts appear together or not at all: files written
for a version whose transaction fails are deleted again.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import Max

from core.api import ConflictError, ServiceError
from core.audit.services import audit_record
from core.events import emit
from core.roles import ADMIN, has_role
from devices_agent.family import FamilySpec, SpecError
from devices_agent.program import default_head
from models_registry.models import Artifact, ModelFamily, ModelVersion
from models_registry.signing import sign_digest
from models_registry.validation import Spooled, spool, validate_onnx, validate_program, validate_safetensors

__all__ = [
    "STAGE_TRANSITIONS",
    "artifact_add",
    "artifact_extension",
    "artifact_storage_name",
    "family_create",
    "version_archive",
    "version_create",
    "version_promote",
]

Stage = ModelVersion.Stage

# Allowed stage changes. A version normally moves draft -> staging -> production ->
# archived; staging can go back to draft, and an archived version can be brought back to
# staging (to be promoted again through the usual gate), never straight to production.
STAGE_TRANSITIONS: dict[str, frozenset[str]] = {
    Stage.DRAFT: frozenset({Stage.STAGING, Stage.ARCHIVED}),
    Stage.STAGING: frozenset({Stage.PRODUCTION, Stage.DRAFT, Stage.ARCHIVED}),
    Stage.PRODUCTION: frozenset({Stage.ARCHIVED}),
    Stage.ARCHIVED: frozenset({Stage.STAGING}),
}

_EXTENSIONS: dict[str, str] = {
    "weights": "safetensors",
    "onnx": "onnx",
    "program": "json",
    "ort_training": "tar.gz",
}


def artifact_extension(kind: str) -> str:
    """The file extension of an artifact kind (``onnx``, ``safetensors``, ``json``, ``tar.gz``)."""
    return _EXTENSIONS.get(kind, "bin")


def artifact_storage_name(*, sha256: str, kind: str) -> str:
    """The content-addressed storage name of an artifact's bytes."""
    return f"artifacts/{sha256[:2]}/{sha256}.{_EXTENSIONS[kind]}"


def family_create(
    *,
    name: str,
    input_shape: list[int],
    task: str = "classification",
    num_classes: int | None = None,
    output_size: int | None = None,
    input_dtype: str = "float32",
    arch: str = "",
    description: str = "",
    actor: Any = None,
) -> ModelFamily:
    """Create a model family; the name is unique (409 ``family_exists`` otherwise).

    The contract is checked as boards will read it (``devices_agent.family.FamilySpec``):
    400 ``invalid_family`` with the reason when it does not hold.
    """
    if not isinstance(input_shape, list) or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ServiceError("input_shape must be a list of positive integers.", code="invalid_input_shape")
    try:
        FamilySpec(
            task=task,
            input_shape=tuple(input_shape),
            input_dtype=input_dtype,
            num_classes=num_classes if task == "classification" else None,
            output_size=output_size if task == "regression" else None,
        )
    except SpecError as exc:
        raise ServiceError(exc.message, code="invalid_family") from None
    with transaction.atomic():
        if ModelFamily.objects.filter(name=name).exists():
            raise ConflictError(f"A model family named {name!r} already exists.", code="family_exists")
        family = ModelFamily.objects.create(
            name=name,
            arch=arch,
            task=task,
            input_shape=input_shape,
            input_dtype=input_dtype,
            num_classes=num_classes if task == "classification" else None,
            output_size=output_size if task == "regression" else None,
            description=description,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )
        audit_record(
            actor=actor,
            action="model_family.create",
            target=family,
            data={"name": name, "task": task, "input_shape": input_shape, "spec": family.spec.to_dict()},
        )
    return family


def _check_declared(spooled: Spooled, declared: str | None, field: str) -> None:
    if declared and declared.strip().lower() != spooled.sha256:
        raise ServiceError(
            f"{field}: the uploaded bytes have SHA-256 {spooled.sha256}, not the declared {declared}.",
            code="digest_mismatch",
            details={"field": field, "declared": declared, "actual": spooled.sha256},
        )


def _store(spooled: Spooled, *, kind: str, created: list[str]) -> str:
    """Save the bytes under their content address; remember names this call created."""
    name = artifact_storage_name(sha256=spooled.sha256, kind=kind)
    if default_storage.exists(name):
        if default_storage.size(name) == spooled.size:
            return name
        # The filesystem storage writes in place, so a process that died mid-write can
        # leave a short file under the content address: replace it.
        default_storage.delete(name)
    with spooled.path.open("rb") as handle:
        saved = default_storage.save(name, File(handle, name=name))
    if saved != name:
        # Another upload of the same bytes won a race between exists() and save(), so the
        # storage picked a fresh name for ours: the canonical file already holds them.
        default_storage.delete(saved)
        return name
    created.append(saved)
    return name


def _discard(names: list[str]) -> None:
    for name in names:
        # A concurrent upload of the same bytes may have committed a row pointing here.
        if Artifact.objects.filter(file=name).exists():
            continue
        try:
            default_storage.delete(name)
        except OSError:  # pragma: no cover - best effort; the row never existed
            pass


def _next_number(family: ModelFamily) -> int:
    latest = ModelVersion.objects.filter(family=family).aggregate(n=Max("number"))["n"]
    return int(latest or 0) + 1


def version_create(
    *,
    family: ModelFamily,
    weights: Any = None,
    onnx: Any = None,
    program: Any = None,
    head: list[str] | None = None,
    parent: ModelVersion | None = None,
    source: str = ModelVersion.Source.UPLOADED,
    source_detail: dict[str, Any] | None = None,
    variant: str = "fp32",
    arch: str = "",
    notes: str = "",
    actor: Any = None,
    declared_sha256: dict[str, str] | None = None,
    metrics: dict[str, Any] | None = None,
    derived: bool = False,
) -> ModelVersion:
    """Register a new version of ``family`` with its artifacts, numbered max+1 in the family.

    ``onnx`` (the graph boards serve), ``weights`` (safetensors by parameter name) and
    ``program`` (the trainable ``torch.export`` JSON, or a ``torch.export.save`` archive
    of which only the JSON is read) are bytes or binary files (e.g. uploaded files). A
    version boards can run needs ``onnx``; one they can train and personalise needs all
    three, checked against each other (:func:`validation.validate_program`). ``head``
    names the program's last-layer parameters (default: the last weight and bias). Each
    file is streamed to a temporary file while its SHA-256 and size are computed,
    validated, stored under its content address, and signed. ``declared_sha256`` maps
    ``"weights"``/``"onnx"``/``"program"`` to digests the client computed; a difference is
    a 400 ``digest_mismatch``. Pickle is refused (400 ``pickle_rejected``), as are files
    over ``MODEL_UPLOAD_MAX_BYTES`` (413 ``too_large``), invalid files
    (``invalid_safetensors``, ``invalid_onnx``, ``invalid_program``, ``unsafe_program``)
    and files that do not fit each other or the family (``shape_mismatch``,
    ``onnx_mismatch``). The version starts in ``draft``. Rows and files appear together
    or not at all. ``derived=True`` (a version made from a checked parent by changing
    weights only: a federated round, pruning) checks the tensors against the program but
    does not run the program against the graph again.
    """
    if weights is None and onnx is None:
        raise ServiceError(
            "A version needs an ONNX model (and weights and a program to train).", code="no_artifacts"
        )
    if program is not None and weights is None:
        raise ServiceError("A program needs its weights.", code="no_weights")
    if source not in ModelVersion.Source.values:
        raise ServiceError(f"Unknown source {source!r}.", code="invalid_source")
    if parent is not None and parent.family_id != family.pk:
        raise ServiceError("The parent version belongs to another family.", code="invalid_parent")
    declared = {k: v for k, v in (declared_sha256 or {}).items() if v}
    limit = int(settings.MODEL_UPLOAD_MAX_BYTES)
    created: list[str] = []
    chosen_head = list(head or [])
    with ExitStack() as stack:
        checked: list[tuple[str, Spooled, dict[str, Any]]] = []
        # Validation (ONNX Runtime loading the model) happens before the transaction, so
        # no lock is held while it runs.
        spooled_weights = spooled_onnx = None
        if weights is not None:
            spooled_weights = stack.enter_context(spool(weights, field="weights", max_bytes=limit))
            _check_declared(spooled_weights, declared.get("weights"), "weights")
            info = validate_safetensors(spooled_weights.path, size=spooled_weights.size)
            checked.append((Artifact.Kind.WEIGHTS, spooled_weights, info))
        if onnx is not None:
            spooled_onnx = stack.enter_context(spool(onnx, field="onnx", max_bytes=limit))
            _check_declared(spooled_onnx, declared.get("onnx"), "onnx")
            info = validate_onnx(spooled_onnx.path, input_shape=list(family.input_shape or []))
            checked.append((Artifact.Kind.ONNX, spooled_onnx, info))
        if program is not None:
            assert spooled_weights is not None
            raw = stack.enter_context(spool(program, field="program", max_bytes=limit))
            _check_declared(raw, declared.get("program"), "program")
            checked_program = validate_program(
                raw.path,
                weights=spooled_weights.path,
                onnx=spooled_onnx.path if spooled_onnx is not None and not derived else None,
                spec=family.spec,
                head=chosen_head,
            )
            if not chosen_head:
                chosen_head = default_head(checked_program["parameters"])
            # The JSON alone is stored: from an archive, its pickled members are dropped.
            spooled_program = stack.enter_context(
                spool(checked_program.pop("program_bytes"), field="program", max_bytes=limit)
            )
            checked.append((Artifact.Kind.PROGRAM, spooled_program, checked_program))
        try:
            with transaction.atomic():
                # Lock the family row so concurrent creations number versions one after
                # the other (PostgreSQL); SQLite's IMMEDIATE transactions serialise anyway.
                ModelFamily.objects.select_for_update().filter(pk=family.pk).get()
                version = ModelVersion.objects.create(
                    family=family,
                    number=_next_number(family),
                    parent=parent,
                    source=source,
                    source_detail=source_detail or {},
                    variant=variant,
                    arch=arch,
                    head=chosen_head,
                    notes=notes,
                    metrics=metrics or {},
                    created_by=actor if getattr(actor, "is_authenticated", False) else None,
                )
                for kind, spooled, info in checked:
                    name = _store(spooled, kind=kind, created=created)
                    artifact = Artifact(
                        version=version,
                        kind=kind,
                        sha256=spooled.sha256,
                        size=spooled.size,
                        signature=sign_digest(spooled.sha256),
                        opset=info.get("opset") if kind == Artifact.Kind.ONNX else None,
                    )
                    artifact.file.name = name
                    artifact.save()
                audit_record(
                    actor=actor,
                    action="model_version.create",
                    target=version,
                    data={
                        "family": family.name,
                        "number": version.number,
                        "source": source,
                        "variant": variant,
                        "parent": parent.pk if parent else None,
                        "artifacts": {kind: spooled.sha256 for kind, spooled, _ in checked},
                    },
                )
                emit(
                    "model_version.created",
                    {
                        "version_id": version.pk,
                        "family_id": family.pk,
                        "source": source,
                        # A graph of its own that boards could train from (not a federated
                        # descendant, which trains from its ancestor's artifacts).
                        "trainable_graph": program is not None and onnx is not None and not derived,
                    },
                )
        except BaseException:
            _discard(created)
            raise
    return version


def version_promote(
    *, version: ModelVersion, stage: str, actor: Any = None, exclusive: bool = False
) -> ModelVersion:
    """Move a version to ``stage`` along :data:`STAGE_TRANSITIONS`.

    An unknown stage is a 400 ``invalid_stage``; a transition not allowed from the current
    stage (including to the stage it is already in) is a 409 ``invalid_transition``.
    Several versions of a family may be in production at once (a rollout moves devices
    from one to the other); with ``exclusive=True`` promoting to production archives the
    family's other production versions in the same transaction.

    Promoting to production needs the admin role (403 ``admin_required``) when a signed-in
    user asks, whatever the way in (the API, the dashboard); ``actor=None`` is the system
    (seeds, tests) and is not checked.
    """
    if stage not in Stage.values:
        raise ServiceError(
            f"Unknown stage {stage!r}; stages are {', '.join(Stage.values)}.", code="invalid_stage"
        )
    if stage == Stage.PRODUCTION and getattr(actor, "is_authenticated", False) and not has_role(actor, ADMIN):
        raise ServiceError(
            "Promoting a version to production needs the admin role.", code="admin_required", status_code=403
        )
    with transaction.atomic():
        locked = ModelVersion.objects.select_for_update().select_related("family").get(pk=version.pk)
        current = locked.stage
        if stage not in STAGE_TRANSITIONS[current]:
            allowed = sorted(STAGE_TRANSITIONS[current])
            raise ConflictError(
                f"{locked.label} is {current}; it can move to {', '.join(allowed)}, not {stage}.",
                code="invalid_transition",
                details={"from": current, "to": stage, "allowed": allowed},
            )
        archived: list[int] = []
        if stage == Stage.PRODUCTION and exclusive:
            others = ModelVersion.objects.filter(family_id=locked.family_id, stage=Stage.PRODUCTION).exclude(
                pk=locked.pk
            )
            archived = list(others.values_list("pk", flat=True))
            others.update(stage=Stage.ARCHIVED)
        locked.stage = stage
        locked.save(update_fields=["stage"])
        audit_record(
            actor=actor,
            action="model_version.promote",
            target=locked,
            data={"from": current, "to": stage, "exclusive": exclusive, "archived": archived},
        )
    version.stage = locked.stage
    return locked


def version_archive(*, version: ModelVersion, actor: Any = None) -> ModelVersion:
    """Archive a version (from any stage but archived)."""
    return version_promote(version=version, stage=Stage.ARCHIVED, actor=actor)


def artifact_add(
    *, version: ModelVersion, kind: str, data: bytes, opset: int | None = None, actor: Any = None
) -> Artifact:
    """Attach an artifact of a kind the version lacks (the ONNX export of its weights, its
    ONNX Runtime training artifacts).

    The bytes are validated like an upload; a version that already has an artifact of
    ``kind`` is a 409 ``artifact_exists`` (artifacts never change once stored).
    """
    if kind not in _EXTENSIONS:
        raise ServiceError(f"Unknown artifact kind {kind!r}.", code="invalid_kind")
    if kind == Artifact.Kind.PROGRAM:
        raise ServiceError(
            "A program is checked against its weights and ONNX graph, so it comes with a new version.",
            code="invalid_kind",
        )
    created: list[str] = []
    with spool(data, field=kind, max_bytes=int(settings.MODEL_UPLOAD_MAX_BYTES)) as spooled:
        if kind == Artifact.Kind.ONNX:
            info = validate_onnx(spooled.path, input_shape=list(version.family.input_shape or []))
            opset = opset or info.get("opset")
        elif kind == Artifact.Kind.ORT_TRAINING:
            from devices_agent.ort_artifacts import ArchiveError, read_manifest

            try:
                opset = read_manifest(spooled.path.read_bytes())["opset"]
            except ArchiveError as exc:
                raise ServiceError(exc.message, code=exc.code) from None
        else:
            validate_safetensors(spooled.path, size=spooled.size)
        try:
            with transaction.atomic():
                ModelVersion.objects.select_for_update().filter(pk=version.pk).get()
                if Artifact.objects.filter(version=version, kind=kind).exists():
                    raise ConflictError(
                        f"{version.label} already has a {kind} artifact.", code="artifact_exists"
                    )
                artifact = Artifact(
                    version=version,
                    kind=kind,
                    sha256=spooled.sha256,
                    size=spooled.size,
                    signature=sign_digest(spooled.sha256),
                    opset=opset if kind in (Artifact.Kind.ONNX, Artifact.Kind.ORT_TRAINING) else None,
                )
                artifact.file.name = _store(spooled, kind=kind, created=created)
                artifact.save()
                audit_record(
                    actor=actor,
                    action="model_version.artifact_add",
                    target=version,
                    data={"kind": kind, "sha256": spooled.sha256, "size": spooled.size},
                )
        except BaseException:
            _discard(created)
            raise
    return artifact
