"""What boards are told about reaching the server: plain HTTP only from a plain-HTTP server, pins."""

from __future__ import annotations

import tomllib

from django.test import override_settings

from devices_agent.config import config_from_mapping
from fleet.agent_setup import agent_run_command
from fleet.services.provisioning import agent_config_toml

PIN = ":".join(["AB"] * 32)


def _toml(server_url: str) -> dict[str, object]:
    return tomllib.loads(agent_config_toml(server_url=server_url, token="et_x", state_dir="/s", name="b"))


def test_provisioning_allows_plain_http_only_when_the_server_itself_is_on_it() -> None:
    with override_settings(PUBLIC_BASE_URL="http://10.0.0.5:8000"):
        lab = _toml("http://10.0.0.5:8000")
        assert lab["allow_insecure_http"] is True
        assert config_from_mapping(lab).allow_insecure_http  # the agent accepts what it is given
        assert "--allow-insecure-http" in agent_run_command(server_url="http://10.0.0.5:8000", token="t")
    with override_settings(PUBLIC_BASE_URL="https://fleet.example"):
        assert "allow_insecure_http" not in _toml("http://fleet.example")
        assert "allow_insecure_http" not in _toml("https://fleet.example")
        assert agent_run_command(server_url="https://fleet.example", token="t") == (
            "flotilla-agent run --server https://fleet.example --token t"
        )


def test_a_self_signed_servers_fingerprint_is_pinned() -> None:
    with override_settings(PUBLIC_BASE_URL="https://fleet.example", SERVER_CERT_SHA256=PIN):
        config = _toml("https://fleet.example")
        assert config["server_cert_sha256"] == PIN
        assert config_from_mapping(config).server_cert_sha256 == "ab" * 32
        command = agent_run_command(server_url="https://fleet.example", token="t", state_dir="/var/x")
        assert command.endswith(f"--state-dir /var/x --server-cert-sha256 {PIN}")
