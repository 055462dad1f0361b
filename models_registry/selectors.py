"""Reads of the model registry, for the API, the fleet (desired state) and the dashboard.

Each selector is one query (plus one prefetch where it says so), so callers on hot paths
such as the heartbeat can use them freely.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django.core.files.storage import default_storage
from django.db.models import Prefetch, QuerySet

from devices_agent import wire
from models_registry.models import Artifact, EvaluationReport, ModelFamily, ModelVersion
from models_registry.signing import signing_public_key_b64

__all__ = [
    "artifact_by_sha256",
    "artifact_chunks",
    "artifact_for_version",
    "artifact_ref",
    "artifact_url",
    "family_get",
    "family_list",
    "signing_public_key_b64",
    "version_children",
    "version_get",
    "version_latest_evaluation",
    "version_lineage",
    "version_list",
]

ARTIFACT_URL_PREFIX = f"{wire.API_PREFIX}artifacts/"


def family_list() -> QuerySet[ModelFamily]:
    """All model families, by name."""
    return ModelFamily.objects.order_by("name")


def family_get(family_id: int) -> ModelFamily:
    """One family by id (raises ``ModelFamily.DoesNotExist``)."""
    return ModelFamily.objects.get(pk=family_id)


def version_list(filters: dict[str, Any] | None = None) -> QuerySet[ModelVersion]:
    """Versions, newest first, with family and artifacts loaded (two queries).

    ``filters`` may hold ``family`` (id), ``family_name``, ``stage``, ``source`` and
    ``variant``; empty values are ignored.
    """
    queryset = (
        ModelVersion.objects.select_related("family", "parent", "parent__family")
        .prefetch_related(Prefetch("artifacts", queryset=Artifact.objects.order_by("kind")))
        .order_by("-created_at", "-id")
    )
    filters = {k: v for k, v in (filters or {}).items() if v not in (None, "")}
    lookups = {
        "family": "family_id",
        "family_name": "family__name",
        "stage": "stage",
        "source": "source",
        "variant": "variant",
    }
    for key, lookup in lookups.items():
        if key in filters:
            queryset = queryset.filter(**{lookup: filters[key]})
    return queryset


def version_get(version_id: int) -> ModelVersion:
    """One version with family, parent and artifacts loaded (raises ``DoesNotExist``)."""
    return version_list().get(pk=version_id)


def artifact_for_version(version_id: int, kind: str) -> Artifact | None:
    """The version's artifact of ``kind`` (``weights`` or ``onnx``), or None."""
    return (
        Artifact.objects.select_related("version", "version__family")
        .filter(version_id=version_id, kind=kind)
        .first()
    )


def artifact_by_sha256(sha256: str) -> Artifact | None:
    """Any artifact whose bytes have this digest (content-addressed: all are identical)."""
    return Artifact.objects.filter(sha256=sha256.lower()).order_by("id").first()


def artifact_url(sha256: str) -> str:
    """Where devices download an artifact: the device API path for its digest."""
    return f"{ARTIFACT_URL_PREFIX}{sha256}"


def _ref(artifact: Artifact) -> wire.ArtifactRef:
    return {
        "kind": artifact.kind,
        "url": artifact_url(artifact.sha256),
        "sha256": artifact.sha256,
        "size": int(artifact.size),
        "signature": artifact.signature,
    }


def artifact_ref(version: ModelVersion, kind: str = Artifact.Kind.ONNX) -> wire.ArtifactRef | None:
    """The heartbeat's reference to a version's artifact of ``kind``, or None.

    Uses the version's prefetched artifacts when present (``version_list``/``version_get``
    prefetch them), so building a desired state costs no extra query.
    """
    for artifact in version.artifacts.all():
        if artifact.kind == kind:
            return _ref(artifact)
    return None


def artifact_chunks(artifact: Artifact, *, start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Stream an artifact's stored bytes ``[start, end)`` (whole file by default) in 1 MiB chunks."""
    chunk = 1024 * 1024
    remaining = (int(artifact.size) if end is None else end) - start
    with default_storage.open(artifact.file.name, "rb") as handle:
        if start:
            handle.seek(start)
        while remaining > 0:
            block = handle.read(min(chunk, remaining))
            if not block:
                return
            remaining -= len(block)
            yield block


def version_lineage(version: ModelVersion, *, max_depth: int = 100) -> list[ModelVersion]:
    """The version's ancestors, parent first (a query per generation; chains are short)."""
    chain: list[ModelVersion] = []
    current = version.parent_id
    seen = {version.pk}
    while current is not None and current not in seen and len(chain) < max_depth:
        parent = ModelVersion.objects.select_related("family").get(pk=current)
        chain.append(parent)
        seen.add(parent.pk)
        current = parent.parent_id
    return chain


def version_children(version: ModelVersion) -> QuerySet[ModelVersion]:
    """Versions derived directly from this one (federated rounds, optimised variants)."""
    return ModelVersion.objects.select_related("family").filter(parent=version).order_by("number")


def version_latest_evaluation(version: ModelVersion) -> EvaluationReport | None:
    """The newest evaluation report of the version, or None."""
    return EvaluationReport.objects.filter(version=version).order_by("-created_at", "-id").first()
