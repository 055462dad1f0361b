"""The agent's configuration: where the server is, how to enroll, where state lives.

A board's config is a small TOML (or JSON) file written by provisioning or by hand::

    server_url = "https://flotilla.example.com"
    server_cert_sha256 = "3f:9a:..."     # optional: pin the server's certificate (self-signed)
    # ca_file = "/etc/flotilla/ca.pem"   # optional: trust this CA bundle instead of the system's
    # allow_insecure_http = true         # only for a server_url of http:// (a lab, a test)
    enrollment_token = "et_..."          # used once; ignored after enrollment
    state_dir = "/var/lib/flotilla-agent"
    name = "line-3-camera"
    tags = ["line-3", "camera"]
    heartbeat_interval_s = 30            # optional override of the server's interval
    outbox_max_samples = 100000
    websocket = true                     # listen for nudges on /ws/agent/
    local_api_socket = "/run/flotilla-agent/agent.sock"   # the application's side
    local_api_group = "sensors"          # who may call it (with local_api_mode "0660")
    data_dir = "/var/lib/line-3/labelled" # optional: .npz files with x and y

    [hardware]                           # overrides of what the agent detects
    accelerator = "none"

Unknown keys are an error, so a typo does not silently fall back to a default.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from devices_agent.tls import normalise_fingerprint, server_ssl_context

__all__ = ["AgentConfig", "ConfigError", "load_config"]


class ConfigError(ValueError):
    """The configuration file is missing, malformed or holds an invalid value."""


@dataclass
class AgentConfig:
    """Everything the agent needs to run; see the module docstring for the file format."""

    server_url: str
    state_dir: Path
    enrollment_token: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    hardware: dict[str, Any] = field(default_factory=dict)
    # None means: use the interval the server returns with every heartbeat.
    heartbeat_interval_s: float | None = None
    outbox_max_samples: int = 100_000
    metrics_batch_size: int = 500
    # Flushing stops after this many batches per heartbeat so a day of queued metrics
    # drains over several heartbeats instead of one long burst.
    max_batches_per_flush: int = 20
    request_timeout_s: float = 15.0
    websocket: bool = True
    # Backoff after failed requests: full jitter over min(cap, base * 2**attempt).
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    # Simulated slow boards: added to every inference (see devices_agent.simulate).
    inference_delay_ms: float = 0.0
    health_check_runs: int = 20
    # The full device state rides on every n-th heartbeat (and whenever it changed).
    state_every: int = 10
    # A drift sketch (devices_agent.drift) is sent every n-th heartbeat; 0 turns it off.
    drift_every: int = 10
    keep_versions: int = 2
    # Learning on the board's own examples (devices_agent.learning): take part in federated
    # rounds with the training backends this board has (and allows), and fine-tune a
    # personal head after each new version, served when it beats the global model.
    train: bool = True
    training_backends: list[str] = field(default_factory=lambda: ["torch", "ort"])
    personalise: bool = True
    personalise_epochs: int = 5
    personalise_min_examples: int = 20
    # Shuffling seed of local training; unset: derived from the device id.
    device_seed: int | None = None
    # The sample store: bounded by count, bytes and age (oldest evicted first), with a
    # fixed share of examples held out to judge models on.
    samples_max: int = 20_000
    samples_max_bytes: int = 64 * 1024 * 1024
    samples_max_age_days: float | None = 30.0
    holdout_percent: int = 20
    # A data source of the board's own, besides what the application sends: a directory
    # of .npz files with x and y, or a Python entry point "module:function".
    data_dir: Path | None = None
    data_entry_point: str | None = None
    # The local API for the application beside the agent (devices_agent.local_api): a Unix
    # socket (default <state_dir>/agent.sock; "" turns it off), its file mode and group,
    # and optionally a loopback address "127.0.0.1:PORT".
    local_api_socket: str | None = None
    local_api_mode: int | str = 0o660
    local_api_group: str | None = None
    local_api_http: str | None = None
    local_api_max_batch: int = 1024
    log_file: Path | None = None
    # TLS (devices_agent.tls): plain http:// is refused unless allowed here, because the
    # device secret and the model artifacts' URLs would travel in the clear. A pinned
    # certificate (SHA-256 of its DER bytes) or a CA file replace the system's CAs.
    allow_insecure_http: bool = False
    server_cert_sha256: str | None = None
    ca_file: Path | None = None

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser()
        self.server_url = self.server_url.rstrip("/")
        if self.log_file is not None:
            self.log_file = Path(self.log_file).expanduser()
        if not self.server_url.startswith(("http://", "https://")):
            raise ConfigError(f"server_url must start with http:// or https://, got {self.server_url!r}")
        if self.server_url.startswith("http://") and not self.allow_insecure_http:
            raise ConfigError(
                f"server_url {self.server_url!r} is plain HTTP: the device secret would travel in the "
                "clear. Use https://, or set allow_insecure_http = true in the agent config "
                "(--allow-insecure-http on the command line) for a lab or test server."
            )
        if self.server_cert_sha256:
            try:
                self.server_cert_sha256 = normalise_fingerprint(self.server_cert_sha256)
            except ValueError as exc:
                raise ConfigError(f"server_cert_sha256: {exc}") from None
        if self.ca_file is not None:
            self.ca_file = Path(self.ca_file).expanduser()
            if not self.ca_file.is_file():
                raise ConfigError(f"ca_file {str(self.ca_file)!r} is not a readable file")
        if self.heartbeat_interval_s is not None and self.heartbeat_interval_s <= 0:
            raise ConfigError("heartbeat_interval_s must be positive")
        if self.outbox_max_samples < 1:
            raise ConfigError("outbox_max_samples must be at least 1")
        if self.metrics_batch_size < 1:
            raise ConfigError("metrics_batch_size must be at least 1")
        if self.keep_versions < 1:
            raise ConfigError("keep_versions must be at least 1")
        if isinstance(self.local_api_mode, str):
            try:
                self.local_api_mode = int(self.local_api_mode, 8)
            except ValueError:
                raise ConfigError(
                    f'local_api_mode must be octal like "0660", got {self.local_api_mode!r}'
                ) from None
        if not 0 <= int(self.local_api_mode) <= 0o777:
            raise ConfigError("local_api_mode must be a file mode between 0000 and 0777")
        if not 0 <= self.holdout_percent < 100:
            raise ConfigError("holdout_percent must be in [0, 100)")
        if self.samples_max < 1 or self.samples_max_bytes < 1:
            raise ConfigError("samples_max and samples_max_bytes must be at least 1")
        if self.data_dir is not None:
            self.data_dir = Path(self.data_dir).expanduser()
        if self.data_entry_point is not None and ":" not in self.data_entry_point:
            raise ConfigError("data_entry_point must look like module:function")
        unknown = [b for b in self.training_backends if b not in ("torch", "ort")]
        if unknown:
            raise ConfigError(f"unknown training backends {unknown}; known: torch, ort")

    @property
    def tls_verify(self) -> Any:
        """httpx's ``verify`` and websockets' ``ssl`` for the server (see devices_agent.tls)."""
        return server_ssl_context(cert_sha256=self.server_cert_sha256, ca_file=self.ca_file)

    @property
    def local_api_socket_path(self) -> Path | None:
        """Where the local API's Unix socket is, or None when it is turned off."""
        if self.local_api_socket == "":
            return None
        return (
            Path(self.local_api_socket).expanduser()
            if self.local_api_socket
            else self.state_dir / "agent.sock"
        )

    @property
    def log_path(self) -> Path:
        """Where the agent log goes (``agent.log`` in the state directory by default)."""
        return self.log_file if self.log_file is not None else self.state_dir / "agent.log"


def config_from_mapping(data: dict[str, Any]) -> AgentConfig:
    """Build an :class:`AgentConfig` from parsed TOML/JSON, rejecting unknown keys."""
    known = {f.name for f in fields(AgentConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
    for required in ("server_url", "state_dir"):
        if not data.get(required):
            raise ConfigError(f"{required} is required")
    try:
        return AgentConfig(**data)
    except TypeError as exc:
        raise ConfigError(str(exc)) from exc


def load_config(path: Path | str) -> AgentConfig:
    """Read a TOML (``.toml``) or JSON (``.json``) config file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc}") from exc
    try:
        if p.suffix == ".json":
            data = json.loads(raw)
        else:
            data = tomllib.loads(raw.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot parse config {p}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config {p} must be a table/object")
    return config_from_mapping(data)
