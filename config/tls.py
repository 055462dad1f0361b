"""The server's TLS certificate: the operator's, or a self-signed one made on first start.

``python -m config.tls --dir /tls`` runs before the web server in the compose stack. When
``<dir>/cert.pem`` and ``<dir>/key.pem`` exist (the operator's certificate, from a mounted
directory) they are used as they are; otherwise a self-signed certificate for the host
names of ``PUBLIC_BASE_URL`` and ``DJANGO_ALLOWED_HOSTS`` is written there (EC P-256, the
key readable only by its owner). Either way the certificate's SHA-256 fingerprint is
printed, which is what a board pins as ``server_cert_sha256`` to trust a self-signed
server. nginx reads the same directory.

No Django here: this runs before anything else of the server, in the web image.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

__all__ = ["Certificate", "ensure_certificate", "fingerprint_of", "self_signed"]

CERT_NAME = "cert.pem"
KEY_NAME = "key.pem"
VALID_DAYS = 825


@dataclass(frozen=True)
class Certificate:
    cert_path: Path
    key_path: Path
    sha256: str  # colon-separated upper-case hex, as openssl prints it
    generated: bool


def fingerprint_of(cert_pem: bytes) -> str:
    """The SHA-256 of a PEM certificate's DER bytes, as ``AB:CD:...``."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def self_signed(hostnames: list[str], *, days: int = VALID_DAYS) -> tuple[bytes, bytes]:
    """A self-signed certificate and its key (PEM) for ``hostnames`` (names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    names = list(dict.fromkeys(h for h in hostnames if h and h != "*")) or ["localhost"]
    key = ec.generate_private_key(ec.SECP256R1())
    alt: list[x509.GeneralName] = []
    for name in names:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt.append(x509.DNSName(name.lstrip(".")))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_certificate(directory: Path, hostnames: list[str]) -> Certificate:
    """The certificate in ``directory``, generated (self-signed) when there is none."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / CERT_NAME, directory / KEY_NAME
    generated = False
    if not (cert_path.exists() and key_path.exists()):
        cert_pem, key_pem = self_signed(hostnames)
        # The key first, never readable by others, then the certificate: a reader that
        # sees the certificate also finds its key.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        tmp = cert_path.with_suffix(".tmp")
        tmp.write_bytes(cert_pem)
        tmp.replace(cert_path)
        generated = True
    return Certificate(
        cert_path=cert_path,
        key_path=key_path,
        sha256=fingerprint_of(cert_path.read_bytes()),
        generated=generated,
    )


def hostnames_from_env(environ: dict[str, str] | os._Environ[str] = os.environ) -> list[str]:
    """The names a self-signed certificate is made for: the public URL's host, then the allowed hosts."""
    names: list[str] = []
    public = urlparse(environ.get("PUBLIC_BASE_URL", "")).hostname
    if public:
        names.append(public)
    names += [h.strip() for h in environ.get("DJANGO_ALLOWED_HOSTS", "").split(",") if h.strip()]
    return names + ["localhost"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m config.tls", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="where cert.pem and key.pem are (or go)")
    parser.add_argument("--host", action="append", default=None, help="host names (default: from env)")
    args = parser.parse_args(argv)
    cert = ensure_certificate(args.dir, args.host or hostnames_from_env())
    origin = "generated a self-signed certificate" if cert.generated else "using the certificate"
    print(f"flotilla tls: {origin} {cert.cert_path}", flush=True)
    print(f"flotilla tls: certificate SHA-256 fingerprint {cert.sha256}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
