"""The agent's cycle against a scripted loopback device API: enroll, heartbeat, commands, metrics."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devices_agent.__main__ import main
from devices_agent.agent import Agent, EnrollmentError
from devices_agent.config import AgentConfig, ConfigError, load_config
from devices_agent.state import KeyMismatchError
from tests.devices_agent.agent_helpers import Handler, ScriptedServer, Signer, linear_onnx

SIGNER = Signer()


class FakeFleet:
    """The scripted server's side of the contract, with switches for failures."""

    def __init__(self, server: ScriptedServer) -> None:
        self.server = server
        self.metrics_down = False
        self.heartbeat_down = False
        self.commands: list[dict[str, Any]] = []
        self.desired: dict[str, Any] | None = None
        self.batches: dict[str, int] = {}
        server.routes[("POST", "/api/agent/v1/enroll")] = self.enroll
        server.routes[("POST", "/api/agent/v1/heartbeat")] = self.heartbeat
        server.routes[("POST", "/api/agent/v1/metrics")] = self.metrics
        server.routes[("POST", r"/api/agent/v1/commands/\d+/result")] = lambda h, b: h.send_json(200, {})
        server.routes[("POST", r"/api/agent/v1/deployments/\d+/status")] = lambda h, b: h.send_json(200, {})

    def enroll(self, h: Handler, body: bytes) -> None:
        req = json.loads(body)
        if req["token"] != "good-token":
            h.send_json(400, {"error": {"code": "invalid_token", "message": "bad token", "details": None}})
            return
        h.send_json(
            201,
            {
                "device_id": "00000000-0000-0000-0000-000000000001",
                "secret": "dev-secret",
                "signing_public_key": SIGNER.public_b64(),
                "heartbeat_interval_s": 42,
                "server_time": "2026-01-01T00:00:00+00:00",
            },
        )

    def heartbeat(self, h: Handler, body: bytes) -> None:
        if self.heartbeat_down:
            h.send_json(503, {"error": {"code": "unavailable", "message": "down", "details": None}})
            return
        commands, self.commands = self.commands, []
        h.send_json(
            200,
            {
                "device_id": "00000000-0000-0000-0000-000000000001",
                "server_time": "2026-01-01T00:00:00+00:00",
                "heartbeat_interval_s": 30,
                "desired": self.desired,
                "policy": {"health_latency_budget_ms": 1000.0},
                "tasks": [
                    {"kind": "train", "round_id": 3, "task_url": "/x", "deadline": "2026-01-01T01:00:00Z"}
                ],
                "commands": commands,
            },
        )

    def metrics(self, h: Handler, body: bytes) -> None:
        if self.metrics_down:
            h.send_json(503, {"error": {"code": "unavailable", "message": "down", "details": None}})
            return
        req = json.loads(body)
        duplicate = req["batch_id"] in self.batches
        self.batches.setdefault(req["batch_id"], len(req["samples"]))
        h.send_json(200, {"accepted": 0 if duplicate else len(req["samples"]), "duplicate": duplicate})


@pytest.fixture
def fleet() -> Iterator[FakeFleet]:
    server = ScriptedServer()
    yield FakeFleet(server)
    server.close()


def make_agent(fleet: FakeFleet, root: Path, token: str = "good-token", **kw: Any) -> Agent:
    config = AgentConfig(
        server_url=fleet.server.url,
        state_dir=root,
        enrollment_token=token,
        name="board-1",
        websocket=False,
        allow_insecure_http=True,
    )
    return Agent(config=config, rng=random.Random(0), sleep=lambda s: None, **kw)


def test_enroll_once_then_heartbeat_with_increasing_seq(fleet: FakeFleet, tmp_path: Path) -> None:
    agent = make_agent(fleet, tmp_path)
    trained: list[int] = []
    agent.task_handlers = {"train": lambda task: trained.append(task["round_id"])}
    result = agent.step()
    assert result.ok and result.interval_s == 30.0
    assert trained == [3]
    agent.step()
    assert trained == [3]  # the same round is handed over once
    assert len(fleet.server.posted("/api/agent/v1/enroll")) == 1
    beats = fleet.server.posted("/api/agent/v1/heartbeat")
    assert [b["seq"] for b in beats] == [1, 2]
    assert beats[0]["state"]["disk_free_mb"] > 0 and "running_version_id" not in beats[0]
    assert beats[0]["agent_version"] and "agent_version" not in beats[1]  # said once per start
    _, _, headers, _ = fleet.server.requests[-1]
    assert headers["Authorization"] == "Device dev-secret"
    agent.close()
    # A restarted agent reuses its credentials and continues the sequence.
    again = make_agent(fleet, tmp_path, token="")
    again.step()
    assert fleet.server.posted("/api/agent/v1/heartbeat")[-1]["seq"] == 3
    assert len(fleet.server.posted("/api/agent/v1/enroll")) == 1
    again.close()


def test_policy_is_kept_by_etag_across_heartbeats_and_restarts(fleet: FakeFleet, tmp_path: Path) -> None:
    policy = {
        "name": "night",
        "max_download_bytes": 500,
        "in_maintenance_window": True,
        "download_allowed": True,
    }
    window = {"open": True}

    def heartbeat(h: Handler, body: bytes) -> None:
        # A server that knows etags: the policy only for an agent whose etag is stale.
        answer: dict[str, Any] = {
            "device_id": "00000000-0000-0000-0000-000000000001",
            "server_time": "2026-01-01T00:00:00+00:00",
            "heartbeat_interval_s": 30,
            "policy_etag": "e1",
            "in_window": window["open"],
        }
        if json.loads(body).get("policy_etag") != "e1":
            answer["policy"] = policy
        h.send_json(200, answer)

    fleet.server.routes[("POST", "/api/agent/v1/heartbeat")] = heartbeat
    agent = make_agent(fleet, tmp_path)
    agent.step()
    window["open"] = False
    agent.step()
    beats = fleet.server.posted("/api/agent/v1/heartbeat")
    assert "policy_etag" not in beats[0] and beats[1]["policy_etag"] == "e1"
    # The policy was left out of the second answer: the agent kept it, with the window applied.
    assert agent.policy["name"] == "night" and agent.policy["max_download_bytes"] == 500
    assert agent.policy["in_maintenance_window"] is False and agent.policy["download_allowed"] is False
    agent.close()
    again = make_agent(fleet, tmp_path, token="")
    assert again.policy["name"] == "night" and again.policy_etag == "e1"
    window["open"] = True
    again.step()
    assert fleet.server.posted("/api/agent/v1/heartbeat")[-1]["policy_etag"] == "e1"
    assert again.policy["in_maintenance_window"] is True and again.policy["download_allowed"] is True
    again.close()


def test_servers_without_etags_still_send_the_policy_every_time(fleet: FakeFleet, tmp_path: Path) -> None:
    agent = make_agent(fleet, tmp_path)
    agent.step()
    agent.step()
    assert all("policy_etag" not in b for b in fleet.server.posted("/api/agent/v1/heartbeat"))
    assert agent.policy == {"health_latency_budget_ms": 1000.0}
    agent.close()


def test_refused_token_is_an_enrollment_error(fleet: FakeFleet, tmp_path: Path) -> None:
    agent = make_agent(fleet, tmp_path, token="wrong")
    with pytest.raises(EnrollmentError, match="bad token"):
        agent.enroll()
    assert agent.state.credentials() is None
    agent.close()


def test_a_new_server_key_is_refused_after_pinning(fleet: FakeFleet, tmp_path: Path) -> None:
    agent = make_agent(fleet, tmp_path)
    creds = agent.enroll()
    from devices_agent.state import Credentials

    with pytest.raises(KeyMismatchError):
        agent.state.save_credentials(
            Credentials(
                device_id=creds.device_id,
                secret=creds.secret,
                signing_public_key=Signer(seed=b"\x05" * 32).public_b64(),
                server_url=creds.server_url,
            )
        )
    agent.close()


def test_metrics_wait_in_the_outbox_while_the_server_is_down(fleet: FakeFleet, tmp_path: Path) -> None:
    agent = make_agent(fleet, tmp_path)
    agent.enroll()
    for i in range(30):
        agent.outbox.add("latency_ms", float(i))
    fleet.metrics_down = True
    agent.step()
    pending = agent.outbox.pending()
    assert pending >= 30
    first_try = [b["batch_id"] for b in fleet.server.posted("/api/agent/v1/metrics")]
    fleet.metrics_down = False
    agent.step()
    assert agent.outbox.pending() == 0
    sent = fleet.server.posted("/api/agent/v1/metrics")
    assert sent[len(first_try)]["batch_id"] == first_try[0]  # the same batch, the same id
    values = sorted(
        s["value"] for b in sent[len(first_try) :] for s in b["samples"] if s["name"] == "latency_ms"
    )
    assert values == [float(i) for i in range(30)]
    agent.close()


def test_heartbeat_failures_back_off_with_jitter_capped_at_the_interval(
    fleet: FakeFleet, tmp_path: Path
) -> None:
    agent = make_agent(fleet, tmp_path)
    agent.step()
    fleet.heartbeat_down = True
    delays = [agent.step().interval_s for _ in range(8)]
    assert all(0.0 <= d <= 30.0 for d in delays)
    assert agent.backoff.attempt == 8
    fleet.heartbeat_down = False
    assert agent.step().ok and agent.backoff.attempt == 0
    agent.close()


def test_commands_run_and_report_results(fleet: FakeFleet, tmp_path: Path) -> None:
    agent = make_agent(fleet, tmp_path)
    agent.config.log_path.write_text("line one\nline two\nline three\n")
    fleet.commands = [
        {"id": 1, "kind": "diagnostics", "args": {}},
        {"id": 2, "kind": "collect_logs", "args": {"lines": 2}},
        {"id": 3, "kind": "self_destruct", "args": {}},
    ]
    agent.step()
    diag = fleet.server.posted("/api/agent/v1/commands/1/result")[0]
    assert diag["ok"] and "CPUExecutionProvider" in diag["result"]["providers"]
    # Whether torch is loaded depends on what ran before in this process (other tests
    # train); the diagnostic must report the truth either way.
    assert diag["result"]["torch_loaded"] is ("torch" in sys.modules)
    logs = fleet.server.posted("/api/agent/v1/commands/2/result")[0]
    assert logs["result"]["log"] == "line two\nline three"
    unknown = fleet.server.posted("/api/agent/v1/commands/3/result")[0]
    assert unknown["ok"] is False
    agent.close()


def test_config_files_and_the_cli(
    fleet: FakeFleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'server_url = "{fleet.server.url}"\nstate_dir = "{tmp_path / "st"}"\n'
        'enrollment_token = "good-token"\nwebsocket = false\ntags = ["a"]\nallow_insecure_http = true\n'
    )
    config = load_config(cfg)
    assert config.tags == ["a"] and config.state_dir == tmp_path / "st"
    bad = tmp_path / "bad.toml"
    bad.write_text('server_url = "http://x"\nstate_dir = "/tmp/x"\nheartbeat_intervall = 3\n')
    with pytest.raises(ConfigError, match="heartbeat_intervall"):
        load_config(bad)

    ref = SIGNER.ref(model := linear_onnx(), version_id=5)
    sha = ref["sha256"]
    fleet.server.routes[("GET", f"/api/agent/v1/artifacts/{sha}")] = lambda h, b: h.serve_bytes(
        model, etag=sha
    )
    fleet.desired = {
        "version_id": 5,
        "label": "digits:v5",
        "family": "digits",
        "spec": {"task": "classification", "input_shape": [64], "input_dtype": "float32", "num_classes": 10},
        "deployment_id": 9,
        "artifact": ref,
        "weights": None,
    }
    assert main(["run", "--config", str(cfg), "--max-steps", "1"]) == 0
    assert main(["status", "--state-dir", str(tmp_path / "st")]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["enrolled"] and status["current_version_id"] == 5
    assert main(["predict", "--state-dir", str(tmp_path / "st"), "--input", json.dumps([0.5] * 64)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["version_id"] == 5 and 0 <= out["predictions"][0]["label"] < 10


def test_restart_command_reports_then_restarts_the_loop(fleet: FakeFleet, tmp_path: Path) -> None:
    from devices_agent.agent import RestartRequested

    agent = make_agent(fleet, tmp_path)
    agent.step()
    fleet.commands = [{"id": 7, "kind": "restart", "args": {}}]
    with pytest.raises(RestartRequested):
        agent.step()
    assert fleet.server.posted("/api/agent/v1/commands/7/result") == [
        {"ok": True, "result": {"restarting": True}}
    ]
    # The long-running loop treats it as a restart, reconnects and goes on beating.
    fleet.commands = [{"id": 8, "kind": "restart", "args": {}}]
    agent.config.heartbeat_interval_s = agent.interval_s = 0.01  # no 30 s wait between cycles
    before = len(fleet.server.posted("/api/agent/v1/heartbeat"))
    agent.run(max_steps=2)
    assert len(fleet.server.posted("/api/agent/v1/heartbeat")) == before + 3
    assert len(fleet.server.posted("/api/agent/v1/commands/8/result")) == 1
    agent.close()
