"""How the agent trusts the server over HTTPS: the system's CAs, a CA file, or a pinned certificate.

A board talks to one server for years, often one with a self-signed certificate made on
the server's first start. Three ways to trust it, in the order the agent looks at them:

* ``server_cert_sha256``: the SHA-256 of the server's certificate (its DER bytes, what
  ``openssl x509 -noout -fingerprint -sha256`` prints and the server logs at start; colons
  and case do not matter). Only that certificate is accepted, whoever signed it, and no
  CA is consulted: a self-signed certificate works, a different one is refused even if a
  public CA signed it.
* ``ca_file``: a PEM bundle of the CAs to trust instead of the system's (a private CA);
  the host name is checked as usual.
* neither: the system's CAs and the host name, as any HTTPS client.

The pin is checked right after the TLS handshake of every connection, for the device API
(httpx) and the nudge websocket alike, before a single request byte is sent.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from pathlib import Path
from typing import Any

__all__ = ["PinMismatchError", "normalise_fingerprint", "server_ssl_context"]


class PinMismatchError(ssl.SSLCertVerificationError):
    """The server presented a certificate other than the pinned one."""


def normalise_fingerprint(value: str) -> str:
    """``AB:CD:...`` or ``abcd...`` as 64 lowercase hex digits; ValueError otherwise."""
    digits = value.replace(":", "").replace(" ", "").strip().lower()
    if len(digits) != 64 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError("a SHA-256 fingerprint is 64 hex digits (colons allowed)")
    return digits


class _PinnedSocket(ssl.SSLSocket):
    """An SSL socket that checks the peer's certificate against its context's pin after the handshake."""

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        pin = getattr(self.context, "pinned_sha256", None)
        if pin is None:
            return
        der = self.getpeercert(binary_form=True)
        got = hashlib.sha256(der).hexdigest() if der else ""
        if not hmac.compare_digest(got, pin):
            self.close()
            raise PinMismatchError(
                f"server certificate SHA-256 {got or '(none)'} is not the pinned server_cert_sha256 {pin}"
            )


class _PinnedContext(ssl.SSLContext):
    pinned_sha256: str | None = None


def server_ssl_context(*, cert_sha256: str | None = None, ca_file: Path | str | None = None) -> Any:
    """What to pass as httpx's ``verify`` and websockets' ``ssl`` for the server.

    ``True`` (system CAs) when neither option is set; an :class:`ssl.SSLContext` otherwise.
    """
    if cert_sha256:
        pinned = _PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        pinned.minimum_version = ssl.TLSVersion.TLSv1_2
        # The pin replaces CA and host-name checks: it names the one certificate to accept.
        pinned.check_hostname = False
        pinned.verify_mode = ssl.CERT_NONE
        pinned.pinned_sha256 = normalise_fingerprint(cert_sha256)
        pinned.sslsocket_class = _PinnedSocket
        return pinned
    if ca_file:
        context = ssl.create_default_context(cafile=str(ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context
    return True
