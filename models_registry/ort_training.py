"""ONNX Runtime training artifacts of versions, for boards that train without PyTorch.

**Where they come from.** The server builds them, once per graph, in a pinned builder
environment (:mod:`models_registry.ml.ort_env`, running :mod:`models_registry.ml.ort_builder`
as a subprocess), and ships them signed like every artifact (kind ``ort_training``, one
archive: :mod:`devices_agent.ort_artifacts`). Not on the boards, because generating the
graphs needs the ``onnx`` package at a release the server itself cannot use (below 1.18),
about 200 MB a board should not carry, and a graph that cannot be trained is then known
once, at registration, for every board, instead of failing on each of them in every round.

**When.** A model job of kind ``ort_training`` (:mod:`models_registry.jobs`, recovered like
the other model jobs), queued when a version with a program is registered
(``ORT_TRAINING_AUTO``), when a federated job that accepts ``ort`` is created for a
version that was never built, or by an operator (``POST model-versions/<id>/ort-training/``).

**What a version records** (``ModelVersion.ort_training``): ``pending`` while the job runs,
then ``ready`` with the artifact's digest, ``not_trainable`` with the reason and, for an
operator without a gradient, ``op`` and ``node``, or ``failed`` when the builder itself
could not run (the reason says why; another request tries again). The graphs take their
weights from the round, so a version made by a federated round from another (the same
graph, new weights) uses its ancestor's artifact: its record is the ancestor's, with
``from_version`` naming the version that holds the artifact, and follows it.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from django.conf import settings

from core.api import ServiceError
from devices_agent import wire
from models_registry.models import Artifact, ModelVersion

__all__ = [
    "FAILED",
    "NOT_TRAINABLE",
    "PENDING",
    "READY",
    "ort_training_artifact",
    "ort_training_build",
    "ort_training_inherit",
    "ort_training_ref",
    "ort_training_status",
]

logger = logging.getLogger(__name__)

PENDING = "pending"
READY = "ready"
NOT_TRAINABLE = "not_trainable"
FAILED = "failed"

Log = Callable[[str], None]


def graph_root(version: ModelVersion) -> ModelVersion:
    """The version whose graph ``version`` has: itself, or the first ancestor it was not
    derived from by a federated round."""
    current = version
    seen = {current.pk}
    while (
        current.source == ModelVersion.Source.FEDERATED
        and current.parent_id
        and current.parent_id not in seen
    ):
        parent = ModelVersion.objects.select_related("family").get(pk=current.parent_id)
        seen.add(parent.pk)
        current = parent
    return current


def graph_chain(version: ModelVersion, root: ModelVersion) -> list[int]:
    ids = [version.pk]
    current = version
    while current.pk != root.pk and current.parent_id:
        ids.append(current.parent_id)
        current = ModelVersion.objects.only("pk", "parent_id").get(pk=current.parent_id)
    return ids


def status_record(*, root_id: int, record: dict[str, Any], also: list[int] | None = None) -> None:
    """Write ``record`` on the root and on every version whose artifact comes from it."""
    value = {**record, "from_version": root_id}
    ModelVersion.objects.filter(pk__in=[root_id, *(also or [])]).update(ort_training=value)
    ModelVersion.objects.filter(ort_training__from_version=root_id).update(ort_training=value)


def ort_training_status(version: ModelVersion) -> str:
    """``pending``, ``ready``, ``not_trainable``, ``failed``, or ``""`` (never requested)."""
    return str((version.ort_training or {}).get("status", ""))


def ort_training_inherit(*, version: ModelVersion, parent: ModelVersion) -> None:
    """A version a federated round made from ``parent`` trains from ``parent``'s artifacts."""
    # Read afresh: the build may have finished while the round ran.
    stored = ModelVersion.objects.filter(pk=parent.pk).values_list("ort_training", flat=True).first()
    record = dict(stored or {})
    if record:
        ModelVersion.objects.filter(pk=version.pk).update(ort_training=record)
        version.ort_training = record


def ort_training_artifact(version: ModelVersion) -> Artifact | None:
    """The ``ort_training`` artifact a ready version trains from (its own or its ancestor's)."""
    record = version.ort_training or {}
    if record.get("status") != READY:
        return None
    return (
        Artifact.objects.filter(version_id=record.get("from_version"), kind=Artifact.Kind.ORT_TRAINING)
        .order_by("id")
        .first()
    )


def ort_training_ref(version: ModelVersion) -> wire.ArtifactRef | None:
    """The round task's reference to the version's ORT training artifacts, or None.

    Its statement names ``version`` (the one that trains from them), also when the archive
    was built from an ancestor's graph.
    """
    from models_registry.selectors import served_ref

    artifact = ort_training_artifact(version)
    if artifact is None:
        return None
    return served_ref(
        version=version,
        kind=artifact.kind,
        sha256=artifact.sha256,
        size=int(artifact.size),
        signature=artifact.signature,
    )


def _builder(say: Log) -> Path:
    """The builder's Python: ``ORT_BUILDER_PYTHON`` (an image's), else one made under
    ``ORT_BUILDER_DIR`` on first use."""
    from models_registry.ml.ort_env import builder_python

    configured = str(getattr(settings, "ORT_BUILDER_PYTHON", "") or "")
    if configured:
        return Path(configured)
    return builder_python(Path(settings.ORT_BUILDER_DIR), log=say)


def ort_training_build(*, version: ModelVersion, log: Log | None = None) -> dict[str, Any]:
    """Build and attach the version's ORT training artifacts, and record the outcome.

    Runs in the ``ort_training`` model job. A graph that cannot be trained is an outcome
    (``not_trainable``, returned), not an error; a builder that cannot run raises after
    recording ``failed``.
    """
    from devices_agent.ort_artifacts import pack
    from models_registry import services
    from models_registry.ml.ort_env import build_artifacts
    from models_registry.selectors import version_onnx, version_trainable

    say = log or logger.info
    trainable = version_trainable(version=version)
    if not trainable:
        raise ServiceError(f"{version.label} has no program to train.", code="no_program")
    spec = version.family.spec
    try:
        python = _builder(say)
        say(f"building the ORT training artifacts of {version.label} with {python}")
        with tempfile.TemporaryDirectory(prefix="flotilla-ort-") as folder:
            answer = build_artifacts(
                python=python,
                onnx=version_onnx(version=version),
                out=Path(folder),
                task=spec.task,
                trainable=trainable,
                input_shape=list(spec.input_shape),
                input_dtype=spec.input_dtype,
                outputs=spec.outputs,
                timeout_s=float(getattr(settings, "ORT_BUILDER_TIMEOUT_S", 900)),
            )
            archive = pack(folder, answer["manifest"]) if answer.get("ok") else None
    except (RuntimeError, OSError, LookupError) as exc:
        status_record(root_id=version.pk, record={"status": FAILED, "reason": str(exc)[:2000]})
        raise ServiceError(f"the ORT artifact builder could not run: {exc}", code="builder_failed") from None
    if archive is None:
        record = {
            "status": NOT_TRAINABLE,
            "code": str(answer.get("code", "")),
            "reason": str(answer.get("reason", ""))[:2000],
            **({"op": str(answer["op"]), "node": str(answer.get("node", ""))} if answer.get("op") else {}),
        }
        status_record(root_id=version.pk, record=record)
        say(f"{version.label} is not trainable with ONNX Runtime: {record['reason']}")
        return {"trainable": False, **record}
    existing = Artifact.objects.filter(version=version, kind=Artifact.Kind.ORT_TRAINING).first()
    artifact = existing or services.artifact_add(
        version=version, kind=Artifact.Kind.ORT_TRAINING, data=archive
    )
    builder = dict(answer["manifest"].get("builder", {}))
    status_record(root_id=version.pk, record={"status": READY, "sha256": artifact.sha256, "builder": builder})
    say(f"ORT training artifacts of {version.label}: {artifact.size} bytes, sha256 {artifact.sha256[:12]}")
    return {"trainable": True, "sha256": artifact.sha256, "size": artifact.size, "builder": builder}
