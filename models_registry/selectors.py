"""Reads of the model registry, for the API, the fleet (desired state) and the dashboard.

Each selector is one query (plus one prefetch where it says so), so callers on hot paths
such as the heartbeat can use them freely.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from typing import Any

from django.core.files.storage import default_storage
from django.db.models import Prefetch, QuerySet

from devices_agent import wire
from models_registry.models import Artifact, EvaluationReport, ModelFamily, ModelVersion
from models_registry.signing import sign_statement, signing_public_key_b64, statement_expires_at

__all__ = [
    "artifact_by_sha256",
    "artifact_chunks",
    "artifact_for_version",
    "artifact_ref",
    "artifact_url",
    "family_comparison",
    "family_get",
    "family_list",
    "family_recommend",
    "rollback_ref",
    "served_ref",
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


def family_get(*, family_id: int) -> ModelFamily | None:
    """One family by id, or None."""
    return ModelFamily.objects.filter(pk=family_id).first()


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


def served_ref(
    *, version: ModelVersion, kind: str, sha256: str, size: int, signature: str
) -> wire.ArtifactRef:
    """How devices are given an artifact of ``version``: its reference with a statement signed now.

    The statement (``wire.ArtifactStatement``) names the family, the version, its number
    and variant, the kind, digest and size, and expires after
    ``ARTIFACT_STATEMENT_LIFETIME_S``. ``version`` is the version the artifact is served
    for, and needs its family loaded. Signing here rather than at upload means artifacts
    stored before statements existed are served exactly like new ones.
    """
    statement = wire.artifact_statement(
        family=version.family.name,
        family_id=version.family_id,
        version_id=version.pk,
        number=version.number,
        variant=version.variant,
        kind=kind,
        sha256=sha256,
        size=int(size),
        expires_at=statement_expires_at(),
    )
    return {
        "kind": kind,
        "url": artifact_url(sha256),
        "sha256": sha256,
        "size": int(size),
        "signature": signature,
        "statement": statement,
        "statement_signature": sign_statement(statement),
    }


def rollback_ref(ref: wire.ArtifactRef, *, deployment_id: int, device_id: str) -> wire.ArtifactRef:
    """``ref`` re-signed for one rollback deployment of one device (same artifact, same expiry).

    Only such a statement lets a board go back to an older version of its family; binding
    the deployment and the device keeps it from being replayed as a downgrade elsewhere.
    """
    base = ref.get("statement")
    if base is None:
        raise ValueError("a reference without a statement cannot be re-signed")
    statement = wire.artifact_statement(
        **{key: base[key] for key in _STATEMENT_ARGS},  # type: ignore[literal-required]
        rollback_for=(int(deployment_id), str(device_id)),
    )
    return {**ref, "statement": statement, "statement_signature": sign_statement(statement)}


_STATEMENT_ARGS = (
    "family",
    "family_id",
    "version_id",
    "number",
    "variant",
    "kind",
    "sha256",
    "size",
    "expires_at",
)


def _ref(artifact: Artifact, version: ModelVersion) -> wire.ArtifactRef:
    return served_ref(
        version=version,
        kind=artifact.kind,
        sha256=artifact.sha256,
        size=int(artifact.size),
        signature=artifact.signature,
    )


def artifact_ref(version: ModelVersion, kind: str = Artifact.Kind.ONNX) -> wire.ArtifactRef | None:
    """The heartbeat's reference to a version's artifact of ``kind``, or None.

    Uses the version's prefetched artifacts when present (``version_list``/``version_get``
    prefetch them), so building a desired state costs no extra query.
    """
    for artifact in version.artifacts.all():
        if artifact.kind == kind:
            return _ref(artifact, version)
    return None


_programs: dict[str, bytes] = {}


def version_program(*, version: ModelVersion) -> bytes | None:
    """The version's program (torch.export JSON), read once per digest, or None."""
    artifact = artifact_for_version(version.pk, Artifact.Kind.PROGRAM)
    if artifact is None:
        return None
    data = _programs.get(artifact.sha256)
    if data is None:
        with artifact.file.open("rb") as handle:
            data = bytes(handle.read())
        if hashlib.sha256(data).hexdigest() != artifact.sha256:
            raise ValueError(f"the stored program of {version.label} does not match its digest")
        if len(_programs) > 16:
            _programs.clear()
        _programs[artifact.sha256] = data
    return data


def version_onnx(*, version: ModelVersion) -> bytes:
    """The version's ONNX graph (``ValueError`` when it has none or it does not match its digest)."""
    artifact = artifact_for_version(version.pk, Artifact.Kind.ONNX)
    if artifact is None:
        raise ValueError(f"{version.label} has no ONNX graph")
    with artifact.file.open("rb") as handle:
        data = bytes(handle.read())
    if hashlib.sha256(data).hexdigest() != artifact.sha256:
        raise ValueError(f"the stored ONNX graph of {version.label} does not match its digest")
    return data


def version_trainable(*, version: ModelVersion) -> list[str] | None:
    """The trainable parameters of the version's program, in its order; None without a program."""
    from devices_agent.program import trainable_names

    program = version_program(version=version)
    return None if program is None else trainable_names(program)


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


def _baseline_of(version: ModelVersion, by_id: dict[int, ModelVersion]) -> ModelVersion:
    # The nearest fp32 ancestor that was not itself produced by an optimisation: the
    # model a variant is compared with.
    current: ModelVersion | None = version
    seen: set[int] = set()
    while current is not None and current.pk not in seen:
        if current.variant == "fp32" and current.source != ModelVersion.Source.OPTIMISED:
            return current
        seen.add(current.pk)
        current = by_id.get(current.parent_id) if current.parent_id else None
    return version


def _ratio(value: Any, base: Any) -> float | None:
    if value is None or base in (None, 0):
        return None
    return float(value) / float(base)


def family_comparison(family: ModelFamily, *, include_archived: bool = False) -> list[dict[str, Any]]:
    """One row per evaluated version of the family: its metric, size, latency and ratios to fp32.

    The metric is the family's primary metric (``metric``: ``accuracy``, or ``mae`` for
    regression), in ``metric_value``; ``metric_delta`` is the value minus the baseline's
    and ``metric_drop`` how much worse it is (positive when worse, whichever direction is
    better). Numbers come from each version's headline metrics (copied from its latest
    evaluation), so this is one query. Ratios (``size_ratio``, ``latency_ratio_b1``,
    ``latency_ratio_b64``) compare a variant with its baseline: the nearest fp32 ancestor
    that is not itself an optimised variant. ``accuracy``/``accuracy_delta`` (and ``mae``)
    are there as well when measured.
    """
    spec = family.spec
    metric = spec.primary_metric
    versions = list(ModelVersion.objects.filter(family=family).order_by("number"))
    by_id = {v.pk: v for v in versions}
    rows = []
    for version in versions:
        metrics = version.metrics or {}
        if not isinstance(metrics.get(metric), int | float):
            continue
        if version.stage == ModelVersion.Stage.ARCHIVED and not include_archived:
            continue
        base = _baseline_of(version, by_id)
        base_metrics = base.metrics or {}
        value = float(metrics[metric])
        base_value = base_metrics.get(metric)
        delta = value - float(base_value) if isinstance(base_value, int | float) else None
        rows.append(
            {
                "version_id": version.pk,
                "label": f"{family.name}:v{version.number}",
                "number": version.number,
                "variant": version.variant,
                "source": version.source,
                "stage": version.stage,
                "arch": version.arch or family.arch,
                "parent_id": version.parent_id,
                "baseline_id": base.pk,
                "dataset": metrics.get("dataset"),
                "metric": metric,
                "metric_value": value,
                "metric_delta": delta,
                "metric_drop": None if delta is None else (-delta if spec.higher_is_better else delta),
                "accuracy": metrics.get("accuracy"),
                "mae": metrics.get("mae"),
                "size_bytes": metrics.get("size_bytes"),
                "compressed_size_bytes": metrics.get("compressed_size_bytes"),
                "p50_batch1_us": metrics.get("p50_batch1_us"),
                "p95_batch1_us": metrics.get("p95_batch1_us"),
                "p50_batch64_us": metrics.get("p50_batch64_us"),
                "size_ratio": _ratio(metrics.get("size_bytes"), base_metrics.get("size_bytes")),
                "latency_ratio_b1": _ratio(metrics.get("p50_batch1_us"), base_metrics.get("p50_batch1_us")),
                "latency_ratio_b64": _ratio(
                    metrics.get("p50_batch64_us"), base_metrics.get("p50_batch64_us")
                ),
                "accuracy_delta": (
                    float(metrics["accuracy"]) - float(base_metrics["accuracy"])
                    if isinstance(metrics.get("accuracy"), int | float)
                    and isinstance(base_metrics.get("accuracy"), int | float)
                    else None
                ),
                "rejected": bool(metrics.get("rejected", False)),
                "rejection_reason": metrics.get("rejection_reason", ""),
            }
        )
    return rows


def family_recommend(
    family: ModelFamily,
    *,
    latency_budget_us: float,
    max_accuracy_drop: float = 0.01,
    min_accuracy: float | None = None,
    max_mae: float | None = None,
    base_version_id: int | None = None,
    fleet_latency: Mapping[int, tuple[float, int]] | None = None,
    min_samples: int = 50,
) -> dict[str, Any]:
    """Recommend the variant of a family to ship under a latency budget.

    Candidates are the base version and the evaluated variants derived from it (not
    archived); the base is ``base_version_id`` or else the newest fp32 production version
    with an evaluation, or else the newest evaluated fp32 version. Variants rejected at
    optimisation are never recommended. Uses ``models_registry.ml.recommend``: the
    smallest variant within budget and at most ``max_accuracy_drop`` worse than the base
    on the family's primary metric wins: accuracy for classification (with an optional
    floor ``min_accuracy``), mean absolute error for regression (``max_accuracy_drop``
    then bounds the mae increase, with an optional ceiling ``max_mae``). Returns
    ``{"base", "recommended", "variants", "metric"}`` (every row annotated with its
    ``decision`` and ``reason``); raises ``ValueError`` for bad arguments or no base.

    ``fleet_latency`` (``version_id -> (p50_ms, n)``, measured on boards of one hardware
    profile) replaces the server latency of variants with at least ``min_samples``
    on-device samples; every row then says ``latency_source`` (``"fleet"`` or ``"server"``)
    and ``latency_samples``.
    """
    from models_registry.ml.recommend import apply_fleet_latency, recommend_variant

    spec = family.spec
    rows = family_comparison(family)
    bases = [r for r in rows if r["version_id"] == r["baseline_id"]]
    if base_version_id is not None:
        bases = [r for r in bases if r["version_id"] == base_version_id]
    else:
        production = [r for r in bases if r["stage"] == ModelVersion.Stage.PRODUCTION]
        bases = production or bases
    if not bases:
        raise ValueError("no evaluated fp32 base version to compare variants with; evaluate one first")
    base = max(bases, key=lambda r: r["number"])
    candidates = [r for r in rows if r["baseline_id"] == base["version_id"]]
    eligible = [r for r in candidates if not r["rejected"]]
    for row in candidates:
        if row["rejected"]:
            row["decision"] = "rejected"
            row["reason"] = f"rejected at optimisation: {row['rejection_reason']}"
    if fleet_latency is not None:
        apply_fleet_latency(variants=candidates, fleet_latency=fleet_latency, min_samples=min_samples)
    measurable = [r for r in eligible if r["p50_batch1_us"] is not None and r["size_bytes"] is not None]
    best = recommend_variant(
        variants=measurable,
        latency_budget_us=latency_budget_us,
        reference=float(base["metric_value"]),
        max_drop=max_accuracy_drop,
        metric=spec.primary_metric,
        higher_is_better=spec.higher_is_better,
        limit=min_accuracy if spec.higher_is_better else max_mae,
    )
    return {"base": base, "recommended": best, "variants": candidates, "metric": spec.primary_metric}
