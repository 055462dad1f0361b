"""The websocket nudge: a ``{"type": "nudge"}`` wakes the agent; no socket is no problem."""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path
from typing import Any

from devices_agent.agent import Agent, start_nudge_listener
from devices_agent.config import AgentConfig
from devices_agent.state import Credentials
from tests.devices_agent.agent_helpers import ScriptedServer, Signer


def _agent(url: str, root: Path) -> Agent:
    config = AgentConfig(server_url=url, state_dir=root, websocket=True, allow_insecure_http=True)
    agent = Agent(config=config, rng=random.Random(0))
    agent.state.save_credentials(
        Credentials(
            device_id="d", secret="dev-secret", signing_public_key=Signer().public_b64(), server_url=url
        )
    )
    return agent


def test_a_nudge_wakes_the_agent(tmp_path: Path) -> None:
    from websockets.sync.server import serve

    seen: list[str] = []

    def handler(ws: Any) -> None:
        seen.append(ws.request.headers.get("Authorization", ""))
        ws.send(json.dumps({"type": "hello"}))
        ws.send(json.dumps({"type": "nudge"}))
        time.sleep(2)

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.socket.getsockname()[1]
        agent = _agent(f"http://127.0.0.1:{port}", tmp_path)
        start_nudge_listener(agent)
        assert agent.nudge.wait(timeout=10)
        assert seen == ["Device dev-secret"]
        agent.stop()
        server.shutdown()
        agent.close()


def test_without_a_websocket_the_interval_still_works(tmp_path: Path) -> None:
    http_only = ScriptedServer()  # answers the upgrade with 404
    try:
        agent = _agent(http_only.url, tmp_path)
        thread = start_nudge_listener(agent)
        time.sleep(0.5)
        assert thread.is_alive() and not agent.nudge.is_set()  # retrying quietly
        agent.wait(0.2)  # the loop's interval wait is unaffected
        agent.stop()
        thread.join(timeout=5)
        assert not thread.is_alive()
        agent.close()
    finally:
        http_only.close()
