"""The artifact statement's canonical encoding (devices_agent.wire): pure, no Django."""

from __future__ import annotations

import json

import pytest

from devices_agent import wire


def _statement(**overrides: object) -> wire.ArtifactStatement:
    fields: dict[str, object] = {
        "family": "digits",
        "family_id": 7,
        "version_id": 12,
        "number": 3,
        "variant": "int8_dynamic",
        "kind": "onnx",
        "sha256": "AB" * 32,
        "size": 1234,
        "expires_at": 1_700_000_000,
    }
    fields.update(overrides)
    return wire.artifact_statement(**fields)  # type: ignore[arg-type]


def test_the_encoding_is_the_domain_then_sorted_compact_json() -> None:
    statement = _statement()
    encoded = wire.statement_bytes(statement)
    assert encoded.startswith(wire.STATEMENT_DOMAIN)
    body = encoded[len(wire.STATEMENT_DOMAIN) :].decode("ascii")
    assert body == (
        '{"expires_at":1700000000,"family":"digits","family_id":7,"format":"flotilla-artifact/1",'
        '"kind":"onnx","number":3,"rollback":false,"sha256":"' + "ab" * 32 + '","size":1234,'
        '"variant":"int8_dynamic","version_id":12}'
    )
    # Key order and spacing on the wire do not matter: the verifier re-encodes the values.
    shuffled = json.loads(json.dumps(dict(reversed(list(statement.items()))), indent=2))
    assert wire.statement_bytes(shuffled) == encoded


def test_every_field_changes_the_encoding() -> None:
    base = wire.statement_bytes(_statement())
    changed = [
        _statement(family="other"),
        _statement(family_id=8),
        _statement(version_id=13),
        _statement(number=4),
        _statement(variant="fp32"),
        _statement(kind="weights"),
        _statement(sha256="cd" * 32),
        _statement(size=1235),
        _statement(expires_at=None),
        _statement(rollback_for=(5, "dev")),
    ]
    encodings = {wire.statement_bytes(s) for s in changed}
    assert base not in encodings and len(encodings) == len(changed)


def test_rollback_statements_name_their_deployment_and_device() -> None:
    statement = _statement(rollback_for=(41, "6f1c"))
    assert statement["rollback"] is True
    assert statement["deployment_id"] == 41 and statement["device_id"] == "6f1c"
    assert "deployment_id" not in _statement() and _statement()["rollback"] is False


def test_unknown_kinds_and_non_json_values_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        _statement(kind="int8")
    with pytest.raises(ValueError):
        wire.statement_bytes({**_statement(), "size": float("nan")})
