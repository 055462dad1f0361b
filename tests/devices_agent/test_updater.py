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
    etag: str | None = None,
    cut_after: list[int] | None = None,
    honour_range: bool = True,
    signer: Signer = SIGNER,
    corrupt: bool = False,
) -> dict[str, Any]:
    """Serve ``data`` under /api/agent/v1/artifacts/<sha>; returns the ArtifactRef."""
    sha, signature = signer.sign(data)
    served = data[:-1] + bytes([data[-1] ^ 0xFF]) if corrupt else data
    cuts = list(cut_after or [])
    tag = etag or f'"{sha}"'

    def route(h: Handler, body: bytes) -> None:
        h.serve_bytes(served, etag=tag, cut_after=cuts.pop(0) if cuts else None, honour_range=honour_range)

    server.routes[("GET", f"/api/agent/v1/artifacts/{sha}")] = route
    return {
        "kind": "onnx",
        "url": f"/api/agent/v1/artifacts/{sha}",
        "sha256": sha,
        "size": len(data),
        "signature": signature,
    }


def desired(version_id: int, deployment_id: int, artifact: dict[str, Any]) -> DesiredModel:
    return {
        "version_id": version_id,
        "label": f"digits:v{version_id}",
        "family": "digits",
        "spec": {"task": "classification", "input_shape": [64], "input_dtype": "float32", "num_classes": 10},
        "deployment_id": deployment_id,
        "artifact": cast(ArtifactRef, artifact),
        "weights": None,
    }


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
    sha, signature = SIGNER.sign(data)
    verify_artifact(path, sha256=sha, signature=signature, public_key=SIGNER.public_raw())
    other = Signer(seed=b"\x09" * 32)
    _, forged = other.sign(data)
    with pytest.raises(VerificationError, match="signature"):
        verify_artifact(path, sha256=sha, signature=forged, public_key=SIGNER.public_raw())
    path.write_bytes(data + b"x")
    with pytest.raises(VerificationError, match="SHA-256"):
        verify_artifact(path, sha256=sha, signature=signature, public_key=SIGNER.public_raw())


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

    wrong_shape = publish(server, linear_onnx(classes=7))  # 7 outputs for a 10-class family
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
    assert updater.reconcile(desired(1, 21, publish(server, linear_onnx(seed=3))), {}).action == "active"
    out = updater.reconcile(
        desired(2, 22, publish(server, linear_onnx(seed=4))), {"health_latency_budget_ms": 0.0001}
    )
    assert out.action == "rolled_back" and "exceeds the budget" in out.message
    assert updater.state.current_version_id() == 1


@pytest.mark.parametrize("kind", ["corrupted", "wrongly_signed"])
def test_bad_artifacts_are_rejected_and_the_old_model_kept(
    server: ScriptedServer, tmp_path: Path, kind: str
) -> None:
    updater = make_updater(server, tmp_path)
    assert updater.reconcile(desired(1, 31, publish(server, linear_onnx(seed=5))), {}).action == "active"
    if kind == "corrupted":
        bad = publish(server, linear_onnx(seed=6), corrupt=True)
    else:
        bad = publish(server, linear_onnx(seed=6), signer=Signer(seed=b"\x07" * 32))
    out = updater.reconcile(desired(2, 32, bad), {})
    assert out.action == "failed" and "rejected" in out.message
    assert reported(server, 32) == ["downloading", "verifying", "failed"]
    assert updater.state.current_version_id() == 1 and updater.state.installed(2) is None
    assert not updater.state.part_path(bad["sha256"]).exists()


def test_policy_limits_and_maintenance_windows(server: ScriptedServer, tmp_path: Path) -> None:
    updater = make_updater(server, tmp_path)
    ref = publish(server, linear_onnx(seed=8))
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
    assert updater.reconcile(desired(1, 51, publish(server, linear_onnx(seed=9))), {}).action == "active"
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
