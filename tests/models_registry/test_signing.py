from __future__ import annotations

import base64
import hashlib
import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest

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


def _statement(**overrides: Any) -> Any:
    from devices_agent import wire

    fields: dict[str, Any] = {
        "family": "digits",
        "family_id": 1,
        "version_id": 4,
        "number": 2,
        "variant": "fp32",
        "kind": "onnx",
        "sha256": _digest(b"model bytes"),
        "size": 11,
    }
    return wire.artifact_statement(**{**fields, **overrides})


def test_statements_signed_by_the_server_verify_on_the_agent(settings: Any, tmp_path: Path) -> None:
    from devices_agent.updater import RefusedError, VerificationError, verify_statement

    settings.ARTIFACT_SIGNING_KEY = ""
    settings.ARTIFACT_SIGNING_KEY_FILE = tmp_path / "key.pem"
    statement = _statement()
    signature = signing.sign_statement(statement)
    public = signing.signing_public_key_b64()
    assert signing.verify_statement(statement, signature, public)
    assert not signing.verify_statement(_statement(version_id=5), signature, public)
    # The same bytes, the agent's side: the one encoding of devices_agent.wire.
    ref = {"kind": "onnx", "sha256": statement["sha256"], "size": 11}
    key = base64.b64decode(public)
    ok = {**ref, "statement": statement, "statement_signature": signature}
    assert verify_statement(ok, public_key=key, version_id=4, family="digits", number=2) == statement
    with pytest.raises(RefusedError, match="version_id 4, not 5"):
        verify_statement(ok, public_key=key, version_id=5)
    tampered = {**ok, "statement": {**statement, "number": 3}}
    with pytest.raises(VerificationError, match="does not verify"):
        verify_statement(tampered, public_key=key)
    # The stored digest signature is no statement signature.
    digest_only = {**ok, "statement_signature": signing.sign_digest(statement["sha256"])}
    with pytest.raises(VerificationError, match="does not verify"):
        verify_statement(digest_only, public_key=key)


def test_expiry_follows_the_lifetime_in_quarter_steps(settings: Any) -> None:
    settings.ARTIFACT_STATEMENT_LIFETIME_S = None
    assert signing.statement_expires_at(now=1000.0) is None
    settings.ARTIFACT_STATEMENT_LIFETIME_S = 400
    # Every moment of a 100 s step gives the same expiry, so the signature (and the desired
    # state's etag) changes once a step; it is always at least the lifetime ahead.
    assert {signing.statement_expires_at(now=t) for t in (1000.0, 1050.5, 1099.9)} == {1500}
    assert signing.statement_expires_at(now=1100.0) == 1600
    for now in range(1000, 1400, 7):
        expires = signing.statement_expires_at(now=float(now))
        assert expires is not None and now + 400 < expires <= now + 500
    assert signing.statement_expires_at(now=1000.0, lifetime_s=8) == 1010
