"""The updater against a scripted loopback device API: resumable download, verification, install, rollback."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from devices_agent.client import AgentClient, ServerError
from devices_agent.state import AgentState
from devices_agent.updater import Updater, VerificationError, download_resumable, verify_artifact
from devices_agent.wire import ArtifactRef, DesiredModel
from tests.devices_agent.agent_helpers import Handler, ScriptedServer, Signer, linear_onnx

SIGNER = Signer()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    s.routes[("POST", r"/api/agent/v1/deployments/\d+/status")] = lambda h, body: h.send_json(
        200, {"ok": True}
    )
    yield s
    s.close()


def publish(
    server: ScriptedServer,
    data: bytes,
    *,
    version_id: int = 1,
    etag: str | None = None,
    cut_after: list[int] | None = None,
    honour_range: bool = True,
    signer: Signer = SIGNER,
    corrupt: bool = False,
    **statement: Any,
) -> dict[str, Any]:
    """Serve ``data`` under /api/agent/v1/artifacts/<sha>; returns the ArtifactRef.

    Its statement names ``version_id`` of family ``digits`` (``statement`` overrides the
    other fields: ``number``, ``family``, ``kind``, ``expires_at``, ``rollback_for``).
    """
    ref = signer.ref(data, version_id=version_id, **statement)
    sha = ref["sha256"]
    served = data[:-1] + bytes([data[-1] ^ 0xFF]) if corrupt else data
    cuts = list(cut_after or [])
    tag = etag or f'"{sha}"'

    def route(h: Handler, body: bytes) -> None:
        h.serve_bytes(served, etag=tag, cut_after=cuts.pop(0) if cuts else None, honour_range=honour_range)

    server.routes[("GET", f"/api/agent/v1/artifacts/{sha}")] = route
    return ref


def desired(
    version_id: int, deployment_id: int, artifact: dict[str, Any], *, rollback: bool = False
) -> DesiredModel:
    """The desired state naming ``version_id`` (number ``version_id``) of family ``digits``."""
    out: DesiredModel = {
        "version_id": version_id,
        "label": f"digits:v{version_id}",
        "family": "digits",
        "number": version_id,
        "spec": {"task": "classification", "input_shape": [64], "input_dtype": "float32", "num_classes": 10},
        "deployment_id": deployment_id,
        "artifact": cast(ArtifactRef, artifact),
        "weights": None,
    }
    if rollback:
        out["rollback"] = True
    return out


def make_updater(server: ScriptedServer, root: Path) -> Updater:
    client = AgentClient(server_url=server.url, secret="dev-secret", timeout_s=5.0)
    return Updater(
        state=AgentState(root),
        client=client,
        public_key=SIGNER.public_raw(),
        sleep=lambda s: None,
        health_runs=3,
    )


def reported(server: ScriptedServer, deployment_id: int) -> list[str]:
    return [b["state"] for b in server.posted(f"/api/agent/v1/deployments/{deployment_id}/status")]


def test_verify_artifact_checks_digest_and_signature(tmp_path: Path) -> None:
    data = linear_onnx()
    path = tmp_path / "m.onnx"
    path.write_bytes(data)
    ref = SIGNER.ref(data, version_id=3)
    statement = verify_artifact(path, ref=ref, public_key=SIGNER.public_raw(), version_id=3)
    assert statement["version_id"] == 3 and statement["sha256"] == ref["sha256"]
    forged = Signer(seed=b"\x09" * 32).ref(data, version_id=3)
    with pytest.raises(VerificationError, match="signature"):
        verify_artifact(path, ref=forged, public_key=SIGNER.public_raw())
    path.write_bytes(data + b"x")
    with pytest.raises(VerificationError, match="SHA-256"):
        verify_artifact(path, ref=ref, public_key=SIGNER.public_raw())


def test_download_resumes_with_range_after_a_cut(server: ScriptedServer, tmp_path: Path) -> None:
    data = linear_onnx(features=64, classes=10) * 3
    ref = publish(server, data, cut_after=[1000])
    client = AgentClient(server_url=server.url, secret="s")
    part = tmp_path / "x.part"
    with pytest.raises(ServerError) as exc:
        download_resumable(client=client, url=ref["url"], part=part, expected_size=len(data))
    assert exc.value.retryable
    assert 0 < part.stat().st_size <= 1000
    got = part.stat().st_size
    download_resumable(client=client, url=ref["url"], part=part, expected_size=len(data))
    assert part.read_bytes() == data
    _, _, headers, _ = server.requests[-1]
    assert headers["Range"] == f"bytes={got}-" and headers["If-Range"] == f'"{ref["sha256"]}"'


def test_download_restarts_from_zero_on_200_or_a_changed_etag(server: ScriptedServer, tmp_path: Path) -> None:
    data = linear_onnx(seed=1) * 2
    client = AgentClient(server_url=server.url, secret="s")
    part = tmp_path / "x.part"
    part.write_bytes(b"garbage-prefix-from-elsewhere")
    ref = publish(server, data, honour_range=False)
    download_resumable(client=client, url=ref["url"], part=part, expected_size=len(data))
    assert part.read_bytes() == data

    # A prefix of an older artifact with its ETag: If-Range mismatches, the server sends
    # the whole new file and the agent starts over rather than splicing.
    part.write_bytes(b"old-bytes")
    part.with_name(part.name + ".etag").write_text('"old-etag"')
    ref = publish(server, data)
    download_resumable(client=client, url=ref["url"], part=part, expected_size=len(data))
    assert part.read_bytes() == data


def test_reconcile_installs_reports_each_state_and_rolls_back_a_bad_model(
    server: ScriptedServer, tmp_path: Path
) -> None:
    updater = make_updater(server, tmp_path)
    good = publish(server, linear_onnx(seed=2))
    out = updater.reconcile(desired(1, 11, good), {"health_latency_budget_ms": 1000.0})
    assert out.action == "active", out
    assert reported(server, 11) == ["downloading", "verifying", "installing", "health_check", "active"]
    assert updater.state.current_version_id() == 1 and updater.state.last_good_version_id() == 1
    # Repeating the same desired state is a no-op.
    assert updater.reconcile(desired(1, 11, good), {}).action == "current"
    assert len(reported(server, 11)) == 5

    wrong_shape = publish(server, linear_onnx(classes=7), version_id=2)  # 7 outputs for a 10-class family
    out = updater.reconcile(desired(2, 12, wrong_shape), {"health_latency_budget_ms": 1000.0})
    assert out.action == "rolled_back" and "output shape" in out.message
    assert reported(server, 12)[-1] == "rolled_back"
    assert updater.state.current_version_id() == 1
    assert updater.state.installed(2) is None
    last = server.posted("/api/agent/v1/deployments/12/status")[-1]
    assert last["detail"]["restored_version_id"] == 1
    # The finished deployment is not retried on the next heartbeat.
    assert updater.reconcile(desired(2, 12, wrong_shape), {}).action == "skipped"


def test_latency_budget_failure_rolls_back(server: ScriptedServer, tmp_path: Path) -> None:
    updater = make_updater(server, tmp_path)
    assert (
        updater.reconcile(desired(1, 21, publish(server, linear_onnx(seed=3), version_id=1)), {}).action
        == "active"
    )
    out = updater.reconcile(
        desired(2, 22, publish(server, linear_onnx(seed=4), version_id=2)),
        {"health_latency_budget_ms": 0.0001},
    )
    assert out.action == "rolled_back" and "exceeds the budget" in out.message
    assert updater.state.current_version_id() == 1


@pytest.mark.parametrize("kind", ["corrupted", "wrongly_signed"])
def test_bad_artifacts_are_rejected_and_the_old_model_kept(
    server: ScriptedServer, tmp_path: Path, kind: str
) -> None:
    updater = make_updater(server, tmp_path)
    assert (
        updater.reconcile(desired(1, 31, publish(server, linear_onnx(seed=5), version_id=1)), {}).action
        == "active"
    )
    if kind == "corrupted":
        bad = publish(server, linear_onnx(seed=6), version_id=2, corrupt=True)
    else:
        bad = publish(server, linear_onnx(seed=6), version_id=2, signer=Signer(seed=b"\x07" * 32))
    out = updater.reconcile(desired(2, 32, bad), {})
    if kind == "corrupted":
        assert out.action == "failed" and "rejected" in out.message and "SHA-256" in out.message
        assert reported(server, 32) == ["downloading", "verifying", "failed"]
    else:
        # The statement is checked before anything is downloaded.
        assert out.action == "failed" and "refused" in out.message and "signature" in out.message
        assert reported(server, 32) == ["failed"]
        assert not [r for r in server.requests if r[0] == "GET"][1:]
    assert updater.state.current_version_id() == 1 and updater.state.installed(2) is None
    assert not updater.state.part_path(bad["sha256"]).exists()


def test_policy_limits_and_maintenance_windows(server: ScriptedServer, tmp_path: Path) -> None:
    updater = make_updater(server, tmp_path)
    ref = publish(server, linear_onnx(seed=8), version_id=1)
    out = updater.reconcile(desired(1, 41, ref), {"in_maintenance_window": False, "download_allowed": False})
    assert out.action == "deferred"
    updater.reconcile(desired(1, 41, ref), {"in_maintenance_window": False, "download_allowed": False})
    assert reported(server, 41) == ["pending"]  # said once, not every heartbeat
    assert not [r for r in server.requests if r[0] == "GET"]

    out = updater.reconcile(desired(1, 41, ref), {"max_download_bytes": 100})
    assert out.action == "failed" and "over the policy limit" in out.message
    assert reported(server, 41)[-1] == "failed"


def test_restart_during_health_check_swaps_back_first(server: ScriptedServer, tmp_path: Path) -> None:
    updater = make_updater(server, tmp_path)
    assert (
        updater.reconcile(desired(1, 51, publish(server, linear_onnx(seed=9), version_id=1)), {}).action
        == "active"
    )
    state = updater.state
    src = state.downloads_dir / "new.part"
    src.write_bytes(linear_onnx(seed=10))
    state.install(version_id=2, source=src, meta={"sha256": "x"})
    # What the agent wrote just before it swapped and lost power mid-check.
    state.update(
        deployment={
            "id": 52,
            "version_id": 2,
            "sha256": "x",
            "stage": "health_check",
            "previous_version_id": 1,
        }
    )
    state.set_current(2, previous_version_id=1)

    restarted = make_updater(server, tmp_path)
    restarted.recover()
    assert restarted.state.current_version_id() == 1
    assert restarted.state.load()["deployment"]["stage"] == "installed"


def test_undelivered_reports_are_kept_and_resent(tmp_path: Path) -> None:
    s = ScriptedServer()
    try:
        down = {"on": True}

        def status(h: Handler, body: bytes) -> None:
            if down["on"]:
                h.send_json(503, {"error": {"code": "unavailable", "message": "down", "details": None}})
            else:
                h.send_json(200, {})

        s.routes[("POST", r"/api/agent/v1/deployments/\d+/status")] = status
        updater = make_updater(s, tmp_path)
        updater.report(61, "failed", "disk full")
        assert updater.last_report() == {"id": 61, "state": "failed"}
        assert len(updater.state.load()["unsent_reports"]) == 1
        down["on"] = False
        updater.flush_reports()
        assert "unsent_reports" not in updater.state.load()
        bodies = [json.loads(b) for m, p, _, b in s.requests if re.search(r"/61/status$", p)]
        assert [b["state"] for b in bodies] == ["failed", "failed"] and bodies[-1]["message"] == "disk full"
    finally:
        s.close()


# --- signed statements: what the agent refuses ---------------------------------------------


def _run_v2(server: ScriptedServer, updater: Updater) -> None:
    """Bring the board to digits v2 (number 2), the version the refusals below try to leave."""
    out = updater.reconcile(desired(2, 70, publish(server, linear_onnx(seed=30), version_id=2)), {})
    assert out.action == "active", out


def _refused(server: ScriptedServer, updater: Updater, deployment_id: int, want: str) -> None:
    last = server.posted(f"/api/agent/v1/deployments/{deployment_id}/status")[-1]
    assert last["state"] == "failed" and want in last["message"], last
    assert last["detail"] == {"refused": True}
    assert reported(server, deployment_id) == ["failed"]  # nothing downloaded
    assert updater.state.current_version_id() == 2  # the board keeps what it ran
    assert "artifact refused" in last["message"]


@pytest.mark.parametrize(
    ("field", "statement", "want"),
    [
        ("version", {"version_id": 3}, "version_id 3, not 4"),
        ("number", {"version_id": 4, "number": 9}, "number 9, not 4"),
        ("family", {"version_id": 4, "family": "other"}, "family 'other', not 'digits'"),
        ("kind", {"version_id": 4, "kind": "program"}, "kind"),
    ],
)
def test_a_statement_naming_something_else_is_refused(
    server: ScriptedServer, tmp_path: Path, field: str, statement: dict[str, Any], want: str
) -> None:
    updater = make_updater(server, tmp_path)
    _run_v2(server, updater)
    ref = publish(server, linear_onnx(seed=31), **statement)
    if field == "kind":
        ref["kind"] = "onnx"  # the reference claims onnx; the signed statement says program
    out = updater.reconcile(desired(4, 71, ref), {})
    assert out.action == "failed"
    _refused(server, updater, 71, want)


def test_a_replayed_artifact_of_an_older_version_is_refused(server: ScriptedServer, tmp_path: Path) -> None:
    updater = make_updater(server, tmp_path)
    old = publish(server, linear_onnx(seed=32), version_id=1)
    assert updater.reconcile(desired(1, 72, old), {}).action == "active"
    _run_v2(server, updater)
    # The validly signed v1 reference offered as v3's artifact: its statement names v1.
    out = updater.reconcile(desired(3, 73, old), {})
    assert out.action == "failed" and "version_id 1, not 3" in out.message
    _refused(server, updater, 73, "version_id 1")


def test_a_tampered_statement_field_fails_the_signature(server: ScriptedServer, tmp_path: Path) -> None:
    updater = make_updater(server, tmp_path)
    _run_v2(server, updater)
    ref = publish(server, linear_onnx(seed=33), version_id=1)
    ref["statement"] = {**ref["statement"], "version_id": 4, "number": 4}  # made to look like v4
    out = updater.reconcile(desired(4, 74, ref), {})
    assert out.action == "failed"
    _refused(server, updater, 74, "signature of the artifact statement does not verify")


def test_a_reference_without_a_statement_is_refused(server: ScriptedServer, tmp_path: Path) -> None:
    updater = make_updater(server, tmp_path)
    _run_v2(server, updater)
    ref = publish(server, linear_onnx(seed=34), version_id=4)
    del ref["statement"], ref["statement_signature"]  # a digest signature alone
    out = updater.reconcile(desired(4, 75, ref), {})
    assert out.action == "failed"
    _refused(server, updater, 75, "no signed statement")


def test_an_expired_statement_is_refused(server: ScriptedServer, tmp_path: Path) -> None:
    updater = make_updater(server, tmp_path)
    _run_v2(server, updater)
    updater.clock = lambda: 1_000_000.0
    expired = publish(server, linear_onnx(seed=35), version_id=4, expires_at=1_000_000)
    out = updater.reconcile(desired(4, 76, expired), {})
    assert out.action == "failed"
    _refused(server, updater, 76, "expired at 1000000")
    fresh = publish(server, linear_onnx(seed=35), version_id=4, expires_at=1_000_001)
    assert updater.reconcile(desired(4, 77, fresh), {}).action == "active"


def test_a_downgrade_is_refused_unless_a_signed_rollback(server: ScriptedServer, tmp_path: Path) -> None:
    from devices_agent.state import Credentials

    updater = make_updater(server, tmp_path)
    updater.state.save_credentials(
        Credentials(device_id="dev-1", secret="s", signing_public_key=SIGNER.public_b64(), server_url="")
    )
    v1 = linear_onnx(seed=36)
    assert updater.reconcile(desired(1, 80, publish(server, v1, version_id=1)), {}).action == "active"
    _run_v2(server, updater)
    assert updater.state.installed(1) is not None  # kept as the last good one

    # v1 again, validly signed, but not as a rollback: refused, although it is installed.
    out = updater.reconcile(desired(1, 81, publish(server, v1, version_id=1)), {})
    assert out.action == "failed" and "downgrade refused" in out.message
    _refused(server, updater, 81, "v1 is older than the running v2")

    # The desired state says rollback, but the statement is not signed as one.
    out = updater.reconcile(desired(1, 82, publish(server, v1, version_id=1), rollback=True), {})
    _refused(server, updater, 82, "not a signed rollback")

    # A rollback statement made for another deployment, or another device: refused.
    other_deployment = publish(server, v1, version_id=1, rollback_for=(99, "dev-1"))
    updater.reconcile(desired(1, 83, other_deployment, rollback=True), {})
    _refused(server, updater, 83, "deployment_id 99, not 83")
    other_device = publish(server, v1, version_id=1, rollback_for=(84, "dev-2"))
    updater.reconcile(desired(1, 84, other_device, rollback=True), {})
    _refused(server, updater, 84, "device_id 'dev-2', not 'dev-1'")

    # A desired state without a deployment id cannot use a rollback statement either.
    unbound = publish(server, v1, version_id=1, rollback_for=(86, "dev-1"))
    out = updater.reconcile({**desired(1, 0, unbound, rollback=True), "deployment_id": None}, {})
    assert out.action == "failed" and "not a signed rollback" in out.message
    assert updater.state.current_version_id() == 2

    # Signed for this deployment and device, and flagged in the desired state: back to v1.
    rollback = publish(server, v1, version_id=1, rollback_for=(85, "dev-1"))
    assert updater.reconcile(desired(1, 85, rollback, rollback=True), {}).action == "active"
    assert updater.state.current_version_id() == 1


def test_an_install_from_before_statements_is_compared_by_its_label(
    server: ScriptedServer, tmp_path: Path
) -> None:
    updater = make_updater(server, tmp_path)
    _run_v2(server, updater)
    meta = dict(updater.state.installed(2).meta)
    del meta["number"]  # what an older agent recorded: the label only
    (updater.state.model_dir(2) / "meta.json").write_text(json.dumps(meta))
    out = updater.reconcile(desired(1, 90, publish(server, linear_onnx(seed=37), version_id=1)), {})
    assert out.action == "failed" and "older than the running v2" in out.message
    # A newer version still installs.
    out = updater.reconcile(desired(3, 91, publish(server, linear_onnx(seed=38), version_id=3)), {})
    assert out.action == "active"


def test_fetched_learning_artifacts_must_be_signed_for_their_version(
    server: ScriptedServer, tmp_path: Path
) -> None:
    from devices_agent.learning import fetch_artifact
    from devices_agent.updater import RefusedError

    client = AgentClient(server_url=server.url, secret="s")
    program = b'{"program": "bytes"}' * 10
    ref = cast(ArtifactRef, publish(server, program, version_id=4, kind="program"))
    # A round's task for base version 5 carrying version 4's program: refused, not fetched.
    with pytest.raises(RefusedError, match="version_id 4, not 5"):
        fetch_artifact(client=client, ref=ref, public_key=SIGNER.public_raw(), folder=tmp_path, version_id=5)
    expired = cast(ArtifactRef, publish(server, program, version_id=5, kind="program", expires_at=1))
    with pytest.raises(RefusedError, match="expired"):
        fetch_artifact(
            client=client, ref=expired, public_key=SIGNER.public_raw(), folder=tmp_path, version_id=5
        )
    assert not [r for r in server.requests if r[0] == "GET"]
    path = fetch_artifact(
        client=client, ref=ref, public_key=SIGNER.public_raw(), folder=tmp_path, version_id=4
    )
    assert path.read_bytes() == program
