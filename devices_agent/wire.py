"""What the agent and the server agree on byte for byte: message shapes, limits, versions.

The server imports this module; it imports nothing from the server. Message bodies are
JSON objects described by the TypedDicts below; tensors travel as safetensors (see the
codecs, re-exported at the bottom). Times are ISO 8601 with a zone; ids of model versions,
deployments, commands and rounds are integers; device ids are UUID strings.
"""

from __future__ import annotations

import json
from typing import Any, Literal, NotRequired, TypedDict

PROTOCOL_VERSION = 1
API_PREFIX = "/api/agent/v1/"
AUTH_SCHEME = "Device"  # Authorization: Device <secret>
# Ed25519 over an artifact's signed statement (statement_bytes below): what the artifact
# is (family, version, kind, digest) and until when, not just its digest.
SIGNATURE_ALGORITHM = "ed25519"
DIGEST_ALGORITHM = "sha256"

MAX_METRIC_SAMPLES_PER_BATCH = 1000
# The training runtimes a board may report and a job may accept.
TRAINING_BACKENDS: tuple[str, ...] = ("torch", "ort")
MAX_BATCH_ID_LENGTH = 64
MAX_METRIC_NAME_LENGTH = 40
DEFAULT_HEARTBEAT_INTERVAL_S = 60

DeploymentState = Literal[
    "pending", "downloading", "verifying", "installing", "health_check", "active", "failed", "rolled_back"
]
DEPLOYMENT_STATES: tuple[str, ...] = (
    "pending",
    "downloading",
    "verifying",
    "installing",
    "health_check",
    "active",
    "failed",
    "rolled_back",
)
# Terminal states end a deployment; a device reports no state after them.
TERMINAL_DEPLOYMENT_STATES = frozenset({"active", "failed", "rolled_back"})

# Metric names the server understands (rollout gates and dashboards use these).
METRIC_NAMES: tuple[str, ...] = (
    "latency_ms",  # one inference, wall time in the agent
    "confidence",  # top-1 probability of a prediction
    "correct",  # 1.0 or 0.0 for a prediction that received a labelled feedback (classification)
    "abs_error",  # mean absolute error of a prediction that received its target (regression)
    "error",  # 1.0 for a failed inference
    "cpu_percent",
    "ram_mb",
    "personal_accuracy",
    "global_accuracy",
    "personal_mae",
    "global_mae",
    "samples_evicted",  # examples the board's full sample store evicted since the last report
    "drift_score",
    "dropped",  # samples the agent's full outbox discarded since the last report
    # Shadow deployments (devices_agent.shadow), tagged with the shadow version's id:
    "shadow_agreement",  # 1.0 when the shadow agreed with the active model on a prediction
    "shadow_correct",  # 1.0 or 0.0: the shadow's answer against a feedback label (classification)
    "shadow_error",  # the shadow's absolute error against a feedback target (regression)
    "shadow_latency_ms",  # one shadow inference, wall time in the agent's shadow worker
    "shadow_skipped",  # sampled predictions the CPU budget skipped since the last report
)

# What each metric's value may be: (lowest, highest, whole numbers only). The server
# refuses a batch holding anything else, so a device cannot move a fleet decision with
# an impossible number (an accuracy of -1e12, an error count of a million).
METRIC_RANGES: dict[str, tuple[float, float, bool]] = {
    "latency_ms": (0.0, 600_000.0, False),
    "confidence": (0.0, 1.0, False),
    "correct": (0.0, 1.0, True),
    "abs_error": (0.0, 1e9, False),
    "error": (0.0, 1.0, True),
    "cpu_percent": (0.0, 100.0 * 1024, False),
    "ram_mb": (0.0, 16.0 * 1024 * 1024, False),
    "personal_accuracy": (0.0, 1.0, False),
    "global_accuracy": (0.0, 1.0, False),
    "personal_mae": (0.0, 1e9, False),
    "global_mae": (0.0, 1e9, False),
    "samples_evicted": (0.0, 1e9, True),
    "drift_score": (0.0, 1e9, False),
    "dropped": (0.0, 1e9, True),
    "shadow_agreement": (0.0, 1.0, True),
    "shadow_correct": (0.0, 1.0, True),
    "shadow_error": (0.0, 1e9, False),
    "shadow_latency_ms": (0.0, 600_000.0, False),
    "shadow_skipped": (0.0, 1e9, True),
}


class Hardware(TypedDict, total=False):
    arch: str
    cores: int
    ram_mb: int
    accelerator: str
    os: str
    agent_version: str
    python: str
    # The training runtimes this board can import ("torch", "ort"); empty: inference only.
    training_backends: list[str]
    extra: dict[str, Any]


class EnrollRequest(TypedDict):
    token: str
    name: str
    hardware: Hardware
    tags: NotRequired[list[str]]


class EnrollResponse(TypedDict):
    device_id: str
    secret: str  # shown once; the server keeps only a keyed hash
    signing_public_key: str  # base64 of the raw 32-byte Ed25519 public key; the agent pins it
    heartbeat_interval_s: int
    server_time: str


class DeploymentReport(TypedDict):
    id: int
    state: DeploymentState


class DeviceState(TypedDict, total=False):
    charging: bool
    idle: bool
    battery_percent: float
    local_examples: int  # labelled examples the board can train on (its holdout excluded)
    holdout_examples: int  # labelled examples kept aside to evaluate models on the board
    training_backends: list[str]
    cpu_percent: float
    ram_mb: float
    disk_free_mb: float


class HeartbeatRequest(TypedDict, total=False):
    seq: int  # increases by one per heartbeat; lets the server ignore reordered requests
    sent_at: str
    agent_version: str
    running_version_id: int | None
    deployment: DeploymentReport | None
    state: DeviceState
    # The etag of the policy the agent holds (from an earlier HeartbeatResponse); the
    # server resends the policy only when its own differs. Absent: the agent has none.
    policy_etag: NotRequired[str]
    # Likewise for the desired model: the etag of the DesiredModel the agent holds.
    desired_etag: NotRequired[str]


# The kinds of artifact a version has (models_registry.models.Artifact.Kind).
ARTIFACT_KINDS: tuple[str, ...] = ("onnx", "weights", "program", "ort_training")
STATEMENT_FORMAT = "flotilla-artifact/1"
# Prefixed to the JSON before signing, so no other message signed with the key (should
# there ever be one) can be taken for an artifact statement.
STATEMENT_DOMAIN = b"flotilla artifact statement v1\n"


class ArtifactStatement(TypedDict):
    """What the server signs for an artifact it serves: every field is bound by the signature.

    ``version_id`` is the version the artifact is served for (an ``ort_training`` archive
    built from an ancestor's graph names the version that trains from it); ``number`` is
    the registry's order of the family's versions (a higher number is newer). ``rollback``
    is true only in a statement made for one rollback deployment (``deployment_id``) of one
    device (``device_id``): the only kind that may take a board to an older version.
    ``expires_at`` (unix seconds) or None: no expiry.
    """

    format: str  # STATEMENT_FORMAT
    family: str
    family_id: int
    version_id: int
    number: int
    variant: str  # fp32, int8_dynamic, ...
    kind: str  # one of ARTIFACT_KINDS
    sha256: str
    size: int
    expires_at: int | None
    rollback: bool
    deployment_id: NotRequired[int]
    device_id: NotRequired[str]


def artifact_statement(
    *,
    family: str,
    family_id: int,
    version_id: int,
    number: int,
    variant: str,
    kind: str,
    sha256: str,
    size: int,
    expires_at: int | None = None,
    rollback_for: tuple[int, str] | None = None,
) -> ArtifactStatement:
    """A statement with its fields normalised; ``rollback_for`` is ``(deployment_id, device_id)``."""
    if kind not in ARTIFACT_KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    statement: ArtifactStatement = {
        "format": STATEMENT_FORMAT,
        "family": str(family),
        "family_id": int(family_id),
        "version_id": int(version_id),
        "number": int(number),
        "variant": str(variant),
        "kind": kind,
        "sha256": str(sha256).lower(),
        "size": int(size),
        "expires_at": None if expires_at is None else int(expires_at),
        "rollback": rollback_for is not None,
    }
    if rollback_for is not None:
        statement["deployment_id"] = int(rollback_for[0])
        statement["device_id"] = str(rollback_for[1])
    return statement


def statement_bytes(statement: ArtifactStatement | dict[str, Any]) -> bytes:
    """The one canonical encoding that is signed and verified.

    :data:`STATEMENT_DOMAIN` followed by the statement as UTF-8 JSON with sorted keys, no
    whitespace (``separators=(",", ":")``) and non-ASCII escaped (``ensure_ascii``); the
    verifier re-encodes the statement it received, so key order or spacing on the wire
    never matters, only the values.
    """
    body = json.dumps(statement, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return STATEMENT_DOMAIN + body.encode("ascii")


class ArtifactRef(TypedDict):
    kind: str  # one of ARTIFACT_KINDS
    url: str  # absolute path under the server, e.g. /api/agent/v1/artifacts/<sha256>
    sha256: str
    size: int
    # base64 Ed25519 over the 32 raw bytes of the digest: the registry's stored signature,
    # kept for agents that predate statements. This agent ignores it: it proves the bytes
    # came from the server, not which version they are, so it could be replayed.
    signature: str
    # What the artifact is, signed: base64 Ed25519 over statement_bytes(statement).
    statement: NotRequired[ArtifactStatement]
    statement_signature: NotRequired[str]


class FamilySpec(TypedDict):
    """A family's task and input contract (``devices_agent.family.FamilySpec``)."""

    task: Literal["classification", "regression"]
    input_shape: list[int]
    input_dtype: str
    num_classes: NotRequired[int]
    output_size: NotRequired[int]


class DesiredModel(TypedDict):
    version_id: int
    label: str
    family: str
    deployment_id: int | None
    artifact: ArtifactRef  # the ONNX graph the board installs and serves
    weights: ArtifactRef | None
    # The family's contract: what inputs look like and what the model answers.
    spec: NotRequired[FamilySpec]
    # The trainable program (torch.export JSON) and the parameters of its last layer,
    # for on-device personalisation; absent for versions registered without one.
    program: NotRequired[ArtifactRef | None]
    head: NotRequired[list[str]]
    # The registry's order of the family's versions (higher is newer); the signed
    # statement carries it too, and that is what the agent compares.
    number: NotRequired[int]
    # True only when the server sends the device back to a version it ran before (a
    # rollout's rollback, an experiment's restore, an operator's explicit rollback); the
    # artifact's statement is then signed for this deployment and device. Anything else
    # that would take a board to an older version of its family is refused as a downgrade.
    rollback: NotRequired[bool]


class Policy(TypedDict, total=False):
    name: str
    timezone: str
    maintenance_windows: list[dict[str, Any]]
    in_maintenance_window: bool
    training: dict[str, Any]
    max_download_bytes: int | None
    download_concurrency: int | None
    health_latency_budget_ms: float
    download_allowed: bool


class TrainingTask(TypedDict):
    kind: Literal["train"]
    round_id: int
    task_url: str
    deadline: str


class RoundTrain(TypedDict):
    epochs: int
    batch_size: int
    optimizer: str  # sgd | adam
    lr: float
    prox_mu: float


class RoundTask(TypedDict):
    """``GET rounds/<id>/task``: what a selected board needs to train for a round."""

    round_id: int
    job_id: int
    round_number: int
    base_version_id: int
    spec: FamilySpec
    program: ArtifactRef  # signed like every artifact; the architecture the board trains
    trainable: list[str]  # the parameters a delta carries, in the program's order
    weights_url: str  # the round's global weights (safetensors), checked by weights_sha256
    weights_sha256: str
    weights_size: int
    update_url: str
    deadline: str | None
    seed: int
    train: RoundTrain
    clip_norm: float | None
    codec: str
    topk_fraction: float
    max_update_bytes: int
    backends: list[str]  # the training backends the job accepts
    # The version's ONNX Runtime training artifacts (devices_agent.ort_artifacts), signed
    # like every artifact, for boards that train with "ort"; None when there are none.
    ort_training: NotRequired[ArtifactRef | None]
    failure_url: NotRequired[str]  # where a board reports why it cannot take part


class RoundFailure(TypedDict):
    """``POST rounds/<id>/failure``: why a selected board ends its part in a round."""

    code: str  # e.g. artifact_unverified, artifacts_mismatch, fedprox_unsupported, training_failed
    message: str
    backend: NotRequired[str]


class Command(TypedDict):
    id: int
    kind: str  # restart | collect_logs | diagnostics
    args: dict[str, Any]


# Fields of Policy that depend on the moment (and on the artifact to download) rather
# than on the policy itself: the policy etag leaves them out.
TIME_VARYING_POLICY_FIELDS = ("in_maintenance_window", "download_allowed")


class ShadowModel(TypedDict):
    """A candidate version the board runs beside its active model, never answering with it.

    ``artifact`` is the candidate's ONNX graph with a statement signed for this version and
    kind ``onnx``; the agent downloads and verifies it like an update and never installs it
    as active. ``sample_rate`` is the share of predictions shadowed; a sampled prediction is
    skipped when the average shadow latency would take more than ``max_cpu_percent`` of
    one core at the current prediction rate, or more than ``budget_ms`` per application
    prediction (average latency x sample rate). ``tolerance`` is the largest absolute
    difference of a regression output that still counts as agreement.
    """

    shadow_id: int
    version_id: int
    label: str
    family: str
    number: int
    artifact: ArtifactRef
    spec: NotRequired[FamilySpec]
    sample_rate: float
    max_cpu_percent: float | None
    budget_ms: float | None
    tolerance: float


class HeartbeatResponse(TypedDict):
    """The answer to a heartbeat.

    Absent means empty or none: a missing ``desired`` is ``None`` (no model wanted), a
    missing ``tasks`` or ``commands`` is ``[]``, and a missing (or null) ``policy`` means
    "unchanged": the agent's copy, whose etag it sent, is current. ``policy_etag`` is
    always sent by servers that know it; ``in_window`` is the time-varying part of the
    policy (whether now is inside a maintenance window), sent on every heartbeat because
    the policy itself is not. When the policy is sent, it is evaluated at the same moment.
    Servers that predate the etag send neither and always send ``policy``.
    """

    device_id: str
    server_time: str
    heartbeat_interval_s: int
    desired: NotRequired[DesiredModel | None]
    # Always sent when a model is wanted; ``desired`` itself only when the etag the agent
    # sent differs. Neither: no model wanted.
    desired_etag: NotRequired[str]
    policy: NotRequired[Policy | None]
    policy_etag: NotRequired[str]
    in_window: NotRequired[bool]
    tasks: NotRequired[list[TrainingTask]]
    commands: NotRequired[list[Command]]
    # A version to run in shadow (absent: none; the agent stops shadowing).
    shadow: NotRequired[ShadowModel]


class MetricSample(TypedDict):
    name: str
    value: float
    ts: str
    version_id: NotRequired[int | None]


class MetricsRequest(TypedDict):
    batch_id: str  # idempotency key: the same batch sent twice is stored once
    samples: list[MetricSample]


class MetricsResponse(TypedDict):
    accepted: int
    duplicate: bool


class DeploymentStatusRequest(TypedDict):
    state: DeploymentState
    message: NotRequired[str]
    detail: NotRequired[dict[str, Any]]
    reported_at: NotRequired[str]


class CommandResultRequest(TypedDict):
    ok: bool
    result: dict[str, Any]


class ErrorBody(TypedDict):
    code: str
    message: str
    details: Any


class ErrorResponse(TypedDict):
    error: ErrorBody


# The tensor codecs are part of the contract too; they live in their own module and are
# re-exported here so both sides can take everything wire-level from one place.
from devices_agent.codecs import (  # noqa: E402
    CODEC_VERSION,
    CODECS,
    EncodedDelta,
    WireError,
    clip_by_norm,
    decode_delta,
    decode_tensors,
    encode_delta,
    encode_tensors,
    expected_layout,
    l2_norm,
)

__all__ = [
    "CODEC_VERSION",
    "CODECS",
    "EncodedDelta",
    "WireError",
    "clip_by_norm",
    "decode_delta",
    "decode_tensors",
    "encode_delta",
    "encode_tensors",
    "expected_layout",
    "l2_norm",
]


class DriftSketch(TypedDict):
    """`POST drift` body: per-feature Welford moments and a top-1 confidence histogram."""

    count: int  # inputs seen in the window
    mean: list[float]  # per-feature mean
    m2: list[float]  # per-feature sum of squared deviations from the mean
    confidence_hist: list[int]  # DRIFT_CONFIDENCE_BINS equal bins over [0, 1]
    # Per binned feature (in DriftFeatureBins order), counts in its reference bins; sent
    # with the etag of the bins once the server has answered with them.
    feature_hist: NotRequired[list[list[int]]]
    bins_etag: NotRequired[str]
    version_id: NotRequired[int | None]
    window_start: NotRequired[str]
    window_end: NotRequired[str]


DRIFT_CONFIDENCE_BINS = 10
DRIFT_MAX_FEATURES = 4096
# Per-feature PSI follows at most this many features (those the reference spreads most),
# each over at most DRIFT_FEATURE_BINS bins: a sketch stays a few kilobytes.
DRIFT_PSI_MAX_FEATURES = 64
DRIFT_FEATURE_BINS = 10


class DriftFeatureBins(TypedDict):
    """The reference's bins for per-feature PSI: interior edges per followed feature."""

    version_id: int
    etag: str  # names these bins; a sketch counted over them says so in `bins_etag`
    features: list[int]  # indices into the sketch's features
    edges: list[list[float]]  # sorted interior edges of each feature (len + 1 bins)


class DriftResponse(TypedDict):
    """`POST drift` answer: the stored report's verdict and numbers."""

    id: int
    alert: bool
    score: float | None
    z_max: float | None
    effect_size: float | None  # largest |mean - reference mean| / reference std
    feature_psi: float | None  # largest per-feature PSI (None without binned counts)
    psi_band: str | None  # "none", "moderate" or "major"
    # The same against the board's own baseline for the version (its first windows);
    # None while this window is part of the baseline. An alert needs both.
    baseline_score: float | None
    baseline_effect_size: float | None
    baseline_feature_psi: float | None
    # The reference's bins, when the sketch was not counted over them (first sketch).
    feature_bins: NotRequired[DriftFeatureBins]
