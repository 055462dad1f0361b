"""Schemathesis fuzzes both APIs, in process, against their own OpenAPI schema.

Every operation of `/api/v1/` (with an operator's token) and of `/api/agent/v1/` (with a
really enrolled device's secret) gets generated requests, valid and invalid ones, through
the WSGI application on this test's own database (pytest-django rolls it back). A run
fails on any 5xx, on a response whose body does not match its schema, on an undocumented
status code, on a content type the schema does not declare, and on a request that breaks
the schema yet is accepted. The seed is fixed
(derandomized) and the examples per operation are bounded, so a run is the same every
time and takes a minute or two; ``FLOTILLA_FUZZ_COVERAGE=1`` adds schemathesis' coverage
phase (every boundary and wrong-type value of every parameter, about ten minutes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.django_db

MAX_EXAMPLES = 8
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture
def credentials(make_user: Any) -> dict[str, str]:
    """Authorization headers: an operator's token and an enrolled device's secret."""
    from django.test import Client
    from django.utils import timezone
    from rest_framework.authtoken.models import Token

    from fleet.services.enrollment import enrollment_token_create

    token, _ = Token.objects.get_or_create(user=make_user("operator"))
    _, enrollment = enrollment_token_create(
        actor=None, name="fuzz", max_uses=1, expires_at=timezone.now() + timedelta(hours=1)
    )
    enrolled = Client().post(
        "/api/agent/v1/enroll",
        {"token": enrollment, "name": "fuzz-board", "hardware": {"arch": "x86_64"}},
        content_type="application/json",
    )
    assert enrolled.status_code == 200, enrolled.content
    return {"operator": f"Token {token.key}", "device": f"Device {enrolled.json()['secret']}"}


@pytest.fixture
def wsgi_app(credentials: dict[str, str]) -> Iterator[Any]:
    """The project's WSGI application on the test's connection.

    Like Django's test client, requests must not close the database connection at their
    end (it holds the test's transaction). After ``credentials``: the test client that
    enrolls the device connects the closing again when it is done.
    """
    from django.core import signals
    from django.core.handlers.wsgi import WSGIHandler
    from django.db import close_old_connections

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield WSGIHandler()
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture
def api_schema(wsgi_app: Any) -> Any:
    loaded = schemathesis.openapi.from_wsgi("/api/schema/?format=json", wsgi_app)
    # The coverage phase sends every boundary and wrong-type value of every parameter
    # (about 9,000 requests, ten minutes here): on demand, not in every run.
    loaded.config.phases.coverage.enabled = bool(os.environ.get("FLOTILLA_FUZZ_COVERAGE"))
    return loaded


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.mark.timeout(600)
@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_api_answers_as_its_schema_says(case: Any, credentials: dict[str, str]) -> None:
    who = "device" if case.path.startswith("/api/agent/") else "operator"
    wait = (case.query or {}).get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 0:
        # The long poll would hold each example up to 30 s: a short wait still goes
        # through the listening path and answers the same shape.
        case.query["wait"] = 0.01
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        # Headers made to break the schema (the credentials left out, among others) go as
        # generated: such a request must be refused.
        case.call_and_validate(checks=CHECKS)
    else:
        case.call_and_validate(headers={"Authorization": credentials[who]}, checks=CHECKS)
