"""Through the real processes: multipart upload over HTTP to uvicorn, jobs run by a Celery worker."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow


def _token(role: str) -> str:
    from django.contrib.auth.models import Group, User
    from rest_framework.authtoken.models import Token

    # get_or_create: a transactional test before this one may have flushed the role groups.
    user = User.objects.create_user(username=f"registry-live-{role}", password="pw-Flotilla-1")
    user.groups.add(Group.objects.get_or_create(name=role)[0])
    return Token.objects.create(user=user).key


def _wait_job(client: httpx.Client, job_id: int, stack: Any, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/api/v1/model-jobs/{job_id}/").json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.5)
    pytest.fail(f"job {job_id} did not finish\n{stack.log('worker')[-3000:]}")


def test_upload_then_optimise_through_web_and_worker(
    live_stack: Any, transactional_db: Any, trained_bundle: Any, digits: Any
) -> None:
    import io

    import numpy as np

    headers = {"Authorization": f"Token {_token('admin')}"}
    onnx = trained_bundle.onnx
    with httpx.Client(base_url=live_stack.url, headers=headers, timeout=60) as client:
        family = client.post(
            "/api/v1/models/",
            json={"name": "live-mlp", "arch": "mlp", "input_shape": [64], "num_classes": 10},
        )
        assert family.status_code == 201, family.text
        _, _, x_test, y_test = digits
        archive = io.BytesIO()
        np.savez(archive, x=x_test, y=y_test)
        dataset = client.post(
            "/api/v1/datasets/",
            data={"family": "live-mlp", "name": "live-mlp-test", "split": "test"},
            files={"file": ("test.npz", archive.getvalue())},
        )
        assert dataset.status_code == 201, dataset.text
        assert dataset.json()["num_examples"] == len(x_test)
        uploaded = client.post(
            "/api/v1/model-versions/",
            data={"family": str(family.json()["id"]), "onnx_sha256": hashlib.sha256(onnx).hexdigest()},
            files={
                "weights": ("w.safetensors", trained_bundle.weights),
                "onnx": ("m.onnx", onnx),
                "program": ("program.json", trained_bundle.program),
            },
        )
        assert uploaded.status_code == 201, uploaded.text
        version_id = uploaded.json()["id"]

        queued = client.post(
            f"/api/v1/model-versions/{version_id}/optimise/",
            json={"kind": "int8_dynamic", "latency_repeats": 5},
        )
        assert queued.status_code == 202, queued.text
        job = _wait_job(client, queued.json()["id"], live_stack)
        assert job["status"] == "succeeded", job["error"] + job["log"]
        variant = client.get(f"/api/v1/model-versions/{job['result_version']}/").json()
        assert variant["parent"] == version_id and variant["variant"] == "int8_dynamic"
        assert variant["stage"] == "draft" and variant["metrics"]["rejected"] is False
        assert variant["metrics"]["dataset"] == "live-mlp-test"

        download = client.get(f"/api/v1/model-versions/{version_id}/artifacts/onnx/")
        assert download.status_code == 200 and download.content == onnx
