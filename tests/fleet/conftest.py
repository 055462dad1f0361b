"""Fixtures for the fleet tests: tokens, enrolled devices, a device-API client, versions."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _fresh_heartbeat_caches() -> Iterator[None]:
    # Row ids are reused after a test's transaction rolls back; cached policies and
    # artifact references from a previous test must not leak into the next.
    from fleet.services.heartbeat import heartbeat_caches_clear

    heartbeat_caches_clear()
    yield
    heartbeat_caches_clear()


@pytest.fixture
def make_token(db: Any) -> Any:
    """Create an enrollment token; returns (row, token)."""
    from django.utils import timezone

    from fleet.services.enrollment import enrollment_token_create

    def make(**kwargs: Any) -> Any:
        kwargs.setdefault("max_uses", 5)
        kwargs.setdefault("expires_at", timezone.now() + timedelta(hours=1))
        return enrollment_token_create(actor=None, **kwargs)

    return make


@dataclass
class Agent:
    """A device-API client: `Authorization: Device <secret>` on every request."""

    client: Any
    device: Any
    secret: str

    def _headers(self) -> dict[str, str]:
        return {"HTTP_AUTHORIZATION": f"Device {self.secret}"}

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, str | bytes) else json.dumps(body)
        return self.client.post(
            f"/api/agent/v1/{path}", data=data, content_type="application/json", **self._headers()
        )

    def get(self, path: str, **headers: str) -> Any:
        return self.client.get(f"/api/agent/v1/{path}", **self._headers(), **headers)

    def heartbeat(self, **body: Any) -> Any:
        return self.post("heartbeat", body)

    def refresh(self) -> Any:
        self.device.refresh_from_db()
        return self.device


@pytest.fixture
def enroll(make_token: Any, client: Any) -> Any:
    """Enroll a device through the real endpoint; returns an Agent for it."""
    from fleet.models import Device

    counter = {"n": 0}

    def do(
        *, tags: list[str] | None = None, hardware: dict[str, Any] | None = None, **token_kwargs: Any
    ) -> Agent:
        counter["n"] += 1
        _, token = make_token(**token_kwargs)
        response = client.post(
            "/api/agent/v1/enroll",
            data=json.dumps(
                {
                    "token": token,
                    "name": f"board-{counter['n']}",
                    "hardware": {"arch": "aarch64", "cores": 4, **(hardware or {})},
                    "tags": tags or [],
                }
            ),
            content_type="application/json",
        )
        assert response.status_code == 200, response.content
        body = response.json()
        return Agent(client=client, device=Device.objects.get(pk=body["device_id"]), secret=body["secret"])

    return do


_REAL = object()


def promote(version: Any, stage: str) -> Any:
    """Move a fresh (draft) version to ``stage`` the way the registry allows: through staging."""
    from models_registry.services import version_promote

    path = {"draft": [], "staging": ["staging"], "production": ["staging", "production"]}[stage]
    for step in path:
        version = version_promote(version=version, stage=step)
    return version


@pytest.fixture
def make_version(db: Any) -> Any:
    """A model version of the classification family ``digits``, promoted to ``stage``
    (production by default: what every device may be given).

    By default a registered digits MLP with all three artifacts (``tests.bundles``); given
    ``onnx`` and/or ``weights`` bytes (None: no such artifact), a bare row with those
    artifacts stored and signed (ONNX bytes of its own unless ``onnx`` says otherwise), for
    tests about the files themselves.
    """
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from models_registry.models import Artifact, ModelVersion
    from models_registry.signing import sign_digest
    from tests.bundles import digits_family, digits_version

    def make(*, onnx: Any = _REAL, weights: Any = _REAL, stage: str = "production") -> ModelVersion:
        family = digits_family("digits")
        if onnx is _REAL and weights is _REAL:
            return promote(digits_version(family), stage)
        # A bare row: ONNX bytes unless told otherwise, weights only when given.
        onnx = b"onnx-bytes-" * 100 if onnx is _REAL else onnx
        weights = None if weights is _REAL else weights
        number = (family.versions.order_by("-number").values_list("number", flat=True).first() or 0) + 1
        version = ModelVersion.objects.create(family=family, number=number)
        for kind, content in (("onnx", onnx), ("weights", weights)):
            if content is None:
                continue
            digest = hashlib.sha256(content).hexdigest()
            name = default_storage.save(f"test-artifacts/{digest}.{kind}", ContentFile(content))
            Artifact.objects.create(
                version=version,
                kind=kind,
                file=name,
                sha256=digest,
                size=len(content),
                signature=sign_digest(digest),
            )
        return promote(version, stage)

    return make


@pytest.fixture
def make_regression_version(db: Any) -> Any:
    """A registered version of the regression family (``tests.bundles.regression_version``),
    promoted to ``stage`` (production by default)."""
    from tests.bundles import regression_version

    def make(*, stage: str = "production", **fields: Any) -> Any:
        return promote(regression_version(**fields), stage)

    return make
