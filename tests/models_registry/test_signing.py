from __future__ import annotations

import base64
import hashlib
import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

from models_registry import signing


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_signature_verifies_with_public_key_and_fails_when_tampered(settings: Any, tmp_path: Path) -> None:
    settings.ARTIFACT_SIGNING_KEY = ""
    settings.ARTIFACT_SIGNING_KEY_FILE = tmp_path / "key.pem"
    digest = _digest(b"model bytes")
    signature = signing.sign_digest(digest)
    public = signing.signing_public_key_b64()
    assert len(base64.b64decode(public)) == 32
    assert signing.verify_digest(digest, signature, public)
    assert signing.verify(public_key_b64=public, hex_sha256=digest, signature_b64=signature)
    assert not signing.verify_digest(_digest(b"other bytes"), signature, public)
    tampered = bytearray(base64.b64decode(signature))
    tampered[0] ^= 1
    assert not signing.verify_digest(digest, base64.b64encode(bytes(tampered)).decode(), public)
    assert not signing.verify_digest("zz", signature, public)
    assert not signing.verify_digest(digest, "not base64!", public)


def test_key_file_is_private_and_reused(settings: Any, tmp_path: Path) -> None:
    path = tmp_path / "keys" / "signing.pem"
    settings.ARTIFACT_SIGNING_KEY = ""
    settings.ARTIFACT_SIGNING_KEY_FILE = path
    first = signing.signing_public_key_b64()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    # A fresh process (empty cache) reads the same file back.
    signing._cache.clear()
    assert signing.signing_public_key_b64() == first
    assert [p.name for p in path.parent.iterdir()] == ["signing.pem"]


def test_seed_from_settings_gives_a_fixed_key(settings: Any) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = bytes(range(32))
    settings.ARTIFACT_SIGNING_KEY = base64.b64encode(seed).decode()
    expected = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    assert signing.signing_public_key_b64() == base64.b64encode(expected).decode()


def _public_key_in_child(path: str, queue: Any) -> None:
    import django
    from django.conf import settings as django_settings

    django.setup()
    django_settings.ARTIFACT_SIGNING_KEY = ""
    django_settings.ARTIFACT_SIGNING_KEY_FILE = Path(path)
    from models_registry import signing as child_signing

    child_signing._cache.clear()
    queue.put(child_signing.signing_public_key_b64())


def test_concurrent_processes_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "race" / "key.pem"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=_public_key_in_child, args=(str(path), queue)) for _ in range(4)]
    for child in children:
        child.start()
    keys = {queue.get(timeout=30) for _ in children}
    for child in children:
        child.join(timeout=30)
    assert len(keys) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["key.pem"]
