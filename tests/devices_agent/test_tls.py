"""The agent and TLS: plain HTTP only when allowed, and a pinned certificate or CA file over real TLS.

The TLS server is Python's ssl module terminating connections in front of the live test
server (uvicorn), with a self-signed certificate made in the test by ``config.tls``, the
same code that makes one on a compose stack's first start.
"""

from __future__ import annotations

import random
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from devices_agent.__main__ import main
from devices_agent.agent import Agent
from devices_agent.client import ServerError
from devices_agent.config import AgentConfig, ConfigError, load_config
from devices_agent.tls import PinMismatchError


def test_plain_http_is_refused_unless_allowed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match="allow_insecure_http"):
        AgentConfig(server_url="http://fleet.example", state_dir=tmp_path)
    assert AgentConfig(server_url="http://fleet.example", state_dir=tmp_path, allow_insecure_http=True)
    assert AgentConfig(server_url="https://fleet.example", state_dir=tmp_path).tls_verify is True

    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'server_url = "http://fleet.example"\nstate_dir = "{tmp_path / "s"}"\n')
    with pytest.raises(ConfigError, match="allow_insecure_http = true"):
        load_config(cfg)
    assert main(["run", "--config", str(cfg), "--max-steps", "1"]) == 2
    assert "allow_insecure_http" in capsys.readouterr().err
    assert main(["run", "--server", "http://fleet.example", "--state-dir", str(tmp_path / "t")]) == 2
    assert "--allow-insecure-http" in capsys.readouterr().err


def test_malformed_pins_and_missing_ca_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="server_cert_sha256"):
        AgentConfig(server_url="https://x", state_dir=tmp_path, server_cert_sha256="abc")
    with pytest.raises(ConfigError, match="ca_file"):
        AgentConfig(server_url="https://x", state_dir=tmp_path, ca_file=tmp_path / "none.pem")
    colons = ":".join(["AB"] * 32)
    config = AgentConfig(server_url="https://x", state_dir=tmp_path, server_cert_sha256=colons)
    assert config.server_cert_sha256 == "ab" * 32
    assert isinstance(config.tls_verify, ssl.SSLContext)


class TlsTerminator:
    """A loopback TLS server that forwards each connection's plaintext to ``target`` (host, port)."""

    def __init__(self, *, cert: Path, key: Path, target: tuple[str, int]) -> None:
        self.target = target
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.closed:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(raw,), daemon=True).start()

    def _serve(self, raw: socket.socket) -> None:
        try:
            client = self.context.wrap_socket(raw, server_side=True)
        except (OSError, ssl.SSLError):
            raw.close()  # a client that refused our certificate
            return
        upstream = socket.create_connection(self.target)
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@pytest.fixture
def tls_server(transactional_db: Any, live_stack: Any, tmp_path: Path) -> Iterator[tuple[TlsTerminator, Any]]:
    from config.tls import ensure_certificate

    cert = ensure_certificate(tmp_path / "tls", ["127.0.0.1", "localhost"])
    assert cert.generated and len(cert.sha256) == 95
    parsed = urlparse(live_stack.url)
    server = TlsTerminator(
        cert=cert.cert_path, key=cert.key_path, target=(parsed.hostname or "", parsed.port or 0)
    )
    yield server, cert
    server.close()


def _token() -> str:
    from fleet.services.enrollment import enrollment_token_create

    _, token = enrollment_token_create(actor=None, name="tls", max_uses=5)
    return token


def _agent(root: Path, url: str, **tls: Any) -> Agent:
    config = AgentConfig(
        server_url=url, state_dir=root, enrollment_token=_token(), name=root.name, websocket=False, **tls
    )
    return Agent(config=config, rng=random.Random(0), sleep=lambda s: None)


@pytest.mark.slow
def test_a_pinned_certificate_is_accepted_and_a_wrong_pin_refused(
    tls_server: tuple[TlsTerminator, Any], tmp_path: Path
) -> None:
    from fleet.models import Device

    server, cert = tls_server
    pinned = _agent(tmp_path / "pinned", server.url, server_cert_sha256=cert.sha256)
    try:
        pinned.enroll()
        pinned.step()
    finally:
        pinned.close()
    device = Device.objects.get(pk=str(pinned.device_id))
    assert device.last_seen is not None

    by_ca = _agent(tmp_path / "by-ca", server.url, ca_file=cert.cert_path)
    try:
        by_ca.enroll()
    finally:
        by_ca.close()
    assert Device.objects.filter(pk=str(by_ca.device_id)).exists()

    wrong = _agent(tmp_path / "wrong", server.url, server_cert_sha256="00" * 32)
    try:
        with pytest.raises(ServerError) as refused:
            wrong.enroll(max_attempts=1)
    finally:
        wrong.close()
    assert "pinned server_cert_sha256" in str(refused.value)

    # Without a pin or a CA file, the system's CAs do not know a self-signed certificate.
    unpinned = _agent(tmp_path / "unpinned", server.url)
    try:
        with pytest.raises(ServerError, match="CERTIFICATE_VERIFY_FAILED"):
            unpinned.enroll(max_attempts=1)
    finally:
        unpinned.close()
    assert not Device.objects.filter(name__in=["wrong", "unpinned"]).exists()
    assert issubclass(PinMismatchError, ssl.SSLError)
