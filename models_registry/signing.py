"""Ed25519 signatures over artifact statements (and, stored, over artifact digests).

What agents verify is a *statement* the server signs when it serves an artifact
(``devices_agent.wire.ArtifactStatement``, encoded by ``wire.statement_bytes``): the
family, the version (id, number, variant), the kind, the digest and size, and an expiry
(``ARTIFACT_STATEMENT_LIFETIME_S``). Signing at serve time means every artifact, however
old, is served with a statement of the current format: nothing needs re-signing. Agents
pin the public key they received at enrollment and refuse any statement that does not
verify or does not name what they were asked to install.

The registry also stores, per artifact, a signature over the 32 raw bytes of its SHA-256
digest (``Artifact.signature``): the operator API shows it, and agents that predate
statements check it. It binds only the bytes, not which version they are.

The private key comes from ``settings.ARTIFACT_SIGNING_KEY`` (base64 of the raw
32-byte seed) or, when that is empty, from the PKCS8 PEM file at
``settings.ARTIFACT_SIGNING_KEY_FILE``, generated on first use.

Several processes (web workers, Celery workers, beat) may all be first: each writes its
candidate key to a private temporary file and publishes it with ``os.link``, which fails
when the target exists, so exactly one candidate wins and every process then reads the
winner. Nobody ever sees a half-written key file.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
import threading
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings

from devices_agent import wire

__all__ = [
    "SigningKeyError",
    "sign_digest",
    "sign_statement",
    "statement_expires_at",
    "verify_statement",
    "signing_key",
    "signing_public_key_b64",
    "verify",
    "verify_digest",
]

_lock = threading.Lock()
# Keyed by where the key came from, so tests that change the settings get the new key.
_cache: dict[tuple[str, str], Ed25519PrivateKey] = {}


class SigningKeyError(RuntimeError):
    """The configured signing key cannot be used."""


def _digest_bytes(sha256_hex: str) -> bytes:
    try:
        raw = bytes.fromhex(sha256_hex)
    except ValueError:
        raise ValueError(f"not a hex SHA-256 digest: {sha256_hex!r}") from None
    if len(raw) != 32:
        raise ValueError(f"a SHA-256 digest has 32 bytes, got {len(raw)}")
    return raw


def _key_from_seed(seed_b64: str) -> Ed25519PrivateKey:
    try:
        seed = base64.b64decode(seed_b64, validate=True)
    except (binascii.Error, ValueError):
        raise SigningKeyError("ARTIFACT_SIGNING_KEY is not valid base64") from None
    if len(seed) != 32:
        raise SigningKeyError(f"ARTIFACT_SIGNING_KEY must decode to 32 bytes, got {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


def _read_pem(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} does not hold an Ed25519 private key")
    return key


def _key_from_file(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        return _read_pem(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    candidate = Ed25519PrivateKey.generate()
    pem = candidate.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    # mkstemp creates the file with mode 0600, so the key is never readable by others,
    # not even for a moment.
    fd, tmp_name = tempfile.mkstemp(prefix=".signing-key-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            # link() refuses an existing target: the first process to link wins, the
            # others read the winner's key below.
            os.link(tmp_name, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp_name)
    return _read_pem(path)


def signing_key() -> Ed25519PrivateKey:
    """The server's artifact-signing private key (cached per process and key source)."""
    seed = str(getattr(settings, "ARTIFACT_SIGNING_KEY", "") or "")
    path = str(settings.ARTIFACT_SIGNING_KEY_FILE)
    source = (seed, "" if seed else path)
    with _lock:
        key = _cache.get(source)
        if key is None:
            key = _key_from_seed(seed) if seed else _key_from_file(Path(path))
            _cache[source] = key
        return key


def sign_digest(sha256_hex: str) -> str:
    """Sign the raw 32 bytes of a hex SHA-256 digest; return the signature as base64."""
    signature = signing_key().sign(_digest_bytes(sha256_hex))
    return base64.b64encode(signature).decode("ascii")


def verify_digest(sha256_hex: str, signature_b64: str, public_key_b64: str) -> bool:
    """Whether ``signature_b64`` is a valid Ed25519 signature of the digest under the key.

    Malformed digests, signatures or keys verify as False rather than raising.
    """
    try:
        digest = _digest_bytes(sha256_hex)
        signature = base64.b64decode(signature_b64, validate=True)
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        public.verify(signature, digest)
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def signing_public_key_b64() -> str:
    """The server's Ed25519 public key: its raw 32 bytes, base64 (what agents pin)."""
    raw = (
        signing_key()
        .public_key()
        .public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    )
    return base64.b64encode(raw).decode("ascii")


def verify(*, public_key_b64: str, hex_sha256: str, signature_b64: str) -> bool:
    """Keyword form of :func:`verify_digest`."""
    return verify_digest(hex_sha256, signature_b64, public_key_b64)


def statement_expires_at(*, now: float | None = None, lifetime_s: int | None = None) -> int | None:
    """When a statement served now expires (unix seconds), or None with no lifetime set.

    Rounded up to a step of a quarter of the lifetime, so every statement served within a
    step is byte for byte the same (Ed25519 signatures are deterministic): the desired
    state's etag changes once a step rather than on every heartbeat. A statement is valid
    for at least the lifetime and at most a step more.
    """
    if lifetime_s is None:
        lifetime_s = getattr(settings, "ARTIFACT_STATEMENT_LIFETIME_S", None)
    if not lifetime_s:
        return None
    lifetime = int(lifetime_s)
    step = max(1, lifetime // 4)
    moment = int(time.time() if now is None else now)
    return (moment // step + 1) * step + lifetime


def sign_statement(statement: wire.ArtifactStatement) -> str:
    """Sign ``wire.statement_bytes(statement)``; the signature as base64."""
    signature = signing_key().sign(wire.statement_bytes(statement))
    return base64.b64encode(signature).decode("ascii")


def verify_statement(statement: wire.ArtifactStatement, signature_b64: str, public_key_b64: str) -> bool:
    """Whether ``signature_b64`` signs the statement under the key (False for malformed input)."""
    try:
        signature = base64.b64decode(signature_b64, validate=True)
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64, validate=True))
        public.verify(signature, wire.statement_bytes(statement))
    except (InvalidSignature, ValueError, TypeError, binascii.Error):
        return False
    return True
