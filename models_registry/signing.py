"""Artifact signing: Ed25519 over the 32 raw bytes of an artifact's SHA-256 digest.

The key comes from `settings.ARTIFACT_SIGNING_KEY` (base64 of the raw 32-byte seed) or,
when that is empty, from the PEM file `settings.ARTIFACT_SIGNING_KEY_FILE`, generated on
first use. Several processes (web workers, Celery workers) may start at once: the file is
written to a temporary name and hard-linked into place, so the first writer wins and every
process reads the same key.
"""

from __future__ import annotations

import base64
import binascii
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from django.conf import settings


def _load_or_create(path: Path) -> Ed25519PrivateKey:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        pem = Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".signing-", suffix=".pem")
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, pem)
            os.fsync(fd)
            os.close(fd)
            try:
                # link() fails if the name exists: a concurrent process won the race and
                # everyone reads its key below.
                os.link(tmp, path)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


@lru_cache(maxsize=1)
def signing_key() -> Ed25519PrivateKey:
    """The server's artifact-signing private key (cached per process)."""
    seed = settings.ARTIFACT_SIGNING_KEY
    if seed:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(seed))
    return _load_or_create(Path(settings.ARTIFACT_SIGNING_KEY_FILE))


def signing_public_key_b64() -> str:
    """Base64 of the raw 32-byte public key, as agents pin it at enrollment."""
    raw = signing_key().public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign_digest(hex_sha256: str) -> str:
    """Base64 Ed25519 signature over the raw bytes of a hex SHA-256 digest."""
    return base64.b64encode(signing_key().sign(bytes.fromhex(hex_sha256))).decode()


def verify(*, public_key_b64: str, hex_sha256: str, signature_b64: str) -> bool:
    """Whether `signature_b64` signs `hex_sha256` under `public_key_b64`."""
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        public.verify(base64.b64decode(signature_b64), bytes.fromhex(hex_sha256))
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True
