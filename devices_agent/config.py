"""The agent's configuration: where the server is, how to enroll, where state lives.

A board's config is a small TOML (or JSON) file written by provisioning or by hand::

    server_url = "https://flotilla.example.com"
    enrollment_token = "et_..."          # used once; ignored after enrollment
    state_dir = "/var/lib/flotilla-agent"
    name = "line-3-camera"
    tags = ["line-3", "camera"]
    heartbeat_interval_s = 30            # optional override of the server's interval
    outbox_max_samples = 100000
    websocket = true                     # listen for nudges on /ws/agent/

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
    # Fine-tune a personal head on the board's local data after each new version
    # (devices_agent.personal); off on real boards, which usually have no labelled data.
    personalise: bool = False
    personalise_epochs: int = 5
    log_file: Path | None = None

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser()
        self.server_url = self.server_url.rstrip("/")
        if self.log_file is not None:
            self.log_file = Path(self.log_file).expanduser()
        if not self.server_url.startswith(("http://", "https://")):
            raise ConfigError(f"server_url must start with http:// or https://, got {self.server_url!r}")
        if self.heartbeat_interval_s is not None and self.heartbeat_interval_s <= 0:
            raise ConfigError("heartbeat_interval_s must be positive")
        if self.outbox_max_samples < 1:
            raise ConfigError("outbox_max_samples must be at least 1")
        if self.metrics_batch_size < 1:
            raise ConfigError("metrics_batch_size must be at least 1")
        if self.keep_versions < 1:
            raise ConfigError("keep_versions must be at least 1")

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
