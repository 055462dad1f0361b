from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def _fresh_drift_counts() -> Iterator[None]:
    """Beat's drift counts live in the shared cache; one test's are not another's."""
    yield
    from django.core.cache import cache

    from fleet.selectors.drift import DRIFT_GROUPS_CACHE_KEY

    # A test that stopped the cache has nothing cached.
    with contextlib.suppress(Exception):
        cache.delete(DRIFT_GROUPS_CACHE_KEY)


@pytest.fixture
def make_user(db: Any) -> Any:
    """Create a user holding one role (viewer, operator or admin)."""
    from django.contrib.auth.models import Group, User

    counter = {"n": 0}

    def make(role: str | None = "operator", **extra: Any) -> User:
        counter["n"] += 1
        user = User.objects.create_user(
            username=f"{role or 'nobody'}{counter['n']}", password="pw-Flotilla-1", **extra
        )
        if role:
            # Transactional tests flush the tables, role groups included: recreate them.
            user.groups.add(Group.objects.get_or_create(name=role)[0])
        return user

    return make


def _client_for(user: Any) -> Any:
    from rest_framework.authtoken.models import Token
    from rest_framework.test import APIClient

    client = APIClient()
    token, _ = Token.objects.get_or_create(user=user)
    client.credentials(HTTP_AUTHORIZATION=f"Token {token.key}")
    setattr(client, "user", user)  # noqa: B010  (tests read the acting user back)
    return client


@pytest.fixture
def viewer_client(make_user: Any) -> Any:
    return _client_for(make_user("viewer"))


@pytest.fixture
def operator_client(make_user: Any) -> Any:
    return _client_for(make_user("operator"))


@pytest.fixture
def admin_client_api(make_user: Any) -> Any:
    return _client_for(make_user("admin"))


@pytest.fixture
def anon_client() -> Any:
    from rest_framework.test import APIClient

    return APIClient()


@pytest.fixture(scope="session")
def live_stack(
    django_db_setup: Any, django_db_blocker: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """uvicorn + a Celery worker on the test database, for the whole session.

    The processes share the test database (a file for SQLite, the test database for
    PostgreSQL), the Redis-protocol server and the data directory with the test process,
    so a test writes rows with the ORM and watches real agents, real HTTP and real workers
    act on them. Tests that use it need `transactional_db` so their rows are committed and
    visible to the server processes.
    """
    from django.conf import settings
    from django.db import connection

    from config.stack import Stack, database_url_of

    with Stack(
        data_dir=settings.DATA_DIR,
        settings="config.settings.test",
        log_dir=tmp_path_factory.mktemp("stack-logs"),
        database_url=database_url_of(connection.settings_dict),
        redis_url=settings.REDIS_URL,
    ) as stack:
        with django_db_blocker.unblock():
            stack.start_web()
            stack.start_worker()
        yield stack


@dataclass(frozen=True)
class TorchlessBoard:
    """A torch-less board's environment: its Python, the installed agent, the process environment."""

    python: Path
    agent_dir: Path
    env: dict[str, str]

    def run(self, *args: str, cwd: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.python), *args], cwd=cwd, env=self.env, capture_output=True, text=True, **kwargs
        )


@pytest.fixture(scope="session")
def ort_builder_python() -> Path:
    """The pinned builder of ORT training artifacts (created once, cached between runs)."""
    from django.conf import settings

    from models_registry.ml.ort_env import builder_python

    return builder_python(Path(settings.ORT_BUILDER_DIR))


@pytest.fixture(scope="session")
def torchless_board(tmp_path_factory: pytest.TempPathFactory) -> TorchlessBoard:
    """A virtualenv with only the agent, ONNX Runtime's training build and the agent's
    dependencies (cached between runs; the agent is installed from this checkout's bundle
    for the session). Proves that torch and the server are not importable there."""
    from config.board_env import board_environ, board_python, install_agent

    python = board_python()
    agent_dir = install_agent(python, tmp_path_factory.mktemp("torchless-agent"))
    board = TorchlessBoard(python=python, agent_dir=agent_dir, env=board_environ(agent_dir))
    cwd = tmp_path_factory.mktemp("torchless-cwd")
    for module in ("torch", "django", "models_registry"):
        refused = board.run("-c", f"import {module}", cwd=cwd)
        assert refused.returncode != 0 and f"No module named '{module}'" in refused.stderr, refused.stderr
    probe = board.run(
        "-c",
        "import json, sys, devices_agent; from devices_agent.backends import available_backends; "
        "print(json.dumps([devices_agent.__file__, available_backends(), 'torch' in sys.modules]))",
        cwd=cwd,
    )
    assert probe.returncode == 0, probe.stderr
    where, backends, torch_loaded = json.loads(probe.stdout)
    assert where.startswith(str(agent_dir)) and backends == ["ort"] and not torch_loaded, probe.stdout
    return board
