"""The agent package and its pinned requirements, for boards installed by hand."""

from __future__ import annotations

import gzip
import io
import tarfile
from typing import Any


def test_viewers_download_an_installable_agent_and_its_pins(viewer_client: Any, anon_client: Any) -> None:
    package = viewer_client.get("/api/v1/agent/package/")
    assert package.status_code == 200 and package["Content-Type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(package.content))) as tar:
        names = tar.getnames()
    assert "flotilla-agent/pyproject.toml" in names and "flotilla-agent/devices_agent/agent.py" in names
    torch = viewer_client.get("/api/v1/agent/requirements/?training=torch").content.decode()
    assert "torch==2.13.0" in torch and "onnxruntime==1.23.0" in torch and "numpy==2.3.3" in torch
    bare = viewer_client.get("/api/v1/agent/requirements/?training=onnxruntime&bare=1").content.decode()
    assert "onnxruntime-training-cpu==1.19.2" in bare
    refused = viewer_client.get("/api/v1/agent/requirements/?training=tensorflow")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "validation_error"
    assert anon_client.get("/api/v1/agent/package/").status_code in (401, 403)
