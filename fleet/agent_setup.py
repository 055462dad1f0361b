"""How a board is told to reach this server: the agent's TLS options and its start command.

One place for what the enrollment-token answers (API and dashboard) and the provisioner's
``agent.toml`` say about the connection. The agent refuses plain HTTP unless told, so only
a server whose own ``PUBLIC_BASE_URL`` is ``http://`` (a lab, a test stack) tells its boards
``allow_insecure_http``; a server with a self-signed certificate tells them its
fingerprint (``SERVER_CERT_SHA256``, what the web service logs at start) to pin.
"""

from __future__ import annotations

import shlex
from typing import Any

from django.conf import settings

__all__ = ["agent_run_command", "agent_tls_options"]


def agent_tls_options(server_url: str) -> dict[str, Any]:
    """The agent config keys about trusting ``server_url``: ``allow_insecure_http`` or a pin."""
    if server_url.startswith("http://"):
        return {"allow_insecure_http": True} if str(settings.PUBLIC_BASE_URL).startswith("http://") else {}
    pin = str(getattr(settings, "SERVER_CERT_SHA256", "") or "")
    return {"server_cert_sha256": pin} if pin else {}


def agent_run_command(*, server_url: str, token: str, state_dir: str | None = None) -> str:
    """The copy-paste line that starts a board's agent and enrolls it with ``token``."""
    parts = ["flotilla-agent", "run", "--server", shlex.quote(server_url), "--token", shlex.quote(token)]
    if state_dir:
        parts += ["--state-dir", shlex.quote(state_dir)]
    options = agent_tls_options(server_url)
    if options.get("allow_insecure_http"):
        parts.append("--allow-insecure-http")
    if options.get("server_cert_sha256"):
        parts += ["--server-cert-sha256", shlex.quote(options["server_cert_sha256"])]
    return " ".join(parts)
