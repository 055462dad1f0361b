"""The server stack the agent and fleet benchmarks run against, started the production way.

A fresh data directory with a SQLite database (or ``DATABASE_URL``), an embedded
Redis-protocol server (or ``REDIS_URL``), migrations, and uvicorn started through
``config.runner`` with the production settings module. This process also sets up Django
on the same database, so a benchmark creates tokens and versions and assigns them with
the services, as an operator's request would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = str(Path(__file__).resolve().parent.parent)
HOST = "127.0.0.1"


@dataclass
class StackInfo:
    """A running stack: its URL, data directory and process group."""

    url: str
    work: Path
    group: Any
    database: str

    def log(self, name: str = "web") -> str:
        path = self.work / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _env(
    work: Path, database_url: str, redis_url: str, port: int, heartbeat_interval_s: int
) -> dict[str, str]:
    from cryptography.fernet import Fernet

    env = dict(os.environ)
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings.production",
            "DJANGO_SECRET_KEY": "benchmark-only-secret-key-" + "x" * 30,
            "DEVICE_SECRET_KEY": "benchmark-only-device-key",
            "PROVISIONING_KEY": Fernet.generate_key().decode(),
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
            "DJANGO_SECURE_COOKIES": "0",
            "FLOTILLA_DATA_DIR": str(work),
            "DATABASE_URL": database_url,
            "REDIS_URL": redis_url,
            "PUBLIC_BASE_URL": f"http://{HOST}:{port}",
            "HEARTBEAT_INTERVAL_S": str(heartbeat_interval_s),
            "LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


@contextmanager
def server_stack(*, web_workers: int = 1, heartbeat_interval_s: int = 60) -> Iterator[StackInfo]:
    """Start the stack; Django is set up in this process on the same database."""
    from config.runner import ProcessGroup, free_port, wait_http_ok, web_command

    work = Path(tempfile.mkdtemp(prefix="flotilla-agent-bench-"))
    redis_url = os.environ.get("REDIS_URL", "")
    if not redis_url:
        from config.embedded_redis import start

        redis_url = start(workdir=work / "redis").url
    database_url = os.environ.get("DATABASE_URL") or f"sqlite:///{work / 'bench.sqlite3'}"
    port = free_port()
    env = _env(work, database_url, redis_url, port, heartbeat_interval_s)
    os.environ.update(
        {k: v for k, v in env.items() if k not in os.environ or k in _OVERRIDES or k.startswith("DJANGO_")}
    )
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], env=env, check=True, cwd=ROOT
    )
    import django

    django.setup()
    group = ProcessGroup(env=env, log_dir=work)
    try:
        web = group.start("web", web_command(port=port, host=HOST, workers=web_workers))
        wait_http_ok(f"http://{HOST}:{port}/healthz", process=web, timeout=90)
        yield StackInfo(
            url=f"http://{HOST}:{port}",
            work=work,
            group=group,
            database="sqlite" if database_url.startswith("sqlite") else database_url.split(":", 1)[0],
        )
    finally:
        group.stop_all()


_OVERRIDES = {"FLOTILLA_DATA_DIR", "DATABASE_URL", "REDIS_URL", "HEARTBEAT_INTERVAL_S", "PUBLIC_BASE_URL"}


def enrollment_token(*, max_uses: int) -> str:
    """A fresh enrollment token for ``max_uses`` devices (valid two hours)."""
    from datetime import timedelta

    from django.utils import timezone

    from fleet.services.enrollment import enrollment_token_create

    _, token = enrollment_token_create(
        actor=None, name="benchmark", max_uses=max_uses, expires_at=timezone.now() + timedelta(hours=2)
    )
    return token


def digits_version(*, seed: int = 0, arch: str = "mlp") -> tuple[Any, Any]:
    """A registered digits model version (ONNX export of seeded initial weights) and the torch module."""
    import numpy as np

    from devices_agent.data import load_digits_split
    from devices_agent.nets import build_model_for_state, initial_weights, load_numpy_state
    from models_registry.ml.export import export_onnx
    from models_registry.models import ModelFamily
    from models_registry.services import version_create

    weights = initial_weights(arch, seed=seed)
    x_train, _, _, _ = load_digits_split(seed=0)
    exported = export_onnx(arch=arch, weights=weights, sample_inputs=np.asarray(x_train[:32]))
    family = ModelFamily.objects.filter(name="bench-digits").first()
    if family is None:
        family = ModelFamily.objects.create(name="bench-digits", arch=arch, input_shape=[64], num_classes=10)
    version = version_create(family=family, onnx=exported.onnx_bytes)
    module = build_model_for_state(arch, weights)
    load_numpy_state(module, weights)
    return version, module
