"""The real server stack for end-to-end tests: uvicorn, a Celery worker and beat as processes.

They share the test database (a file for SQLite, the test database for PostgreSQL), the
Redis-protocol server and the data directory with the test process, so a test writes rows
with the ORM and watches real agents, real HTTP and real workers act on them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection

from config.runner import ProcessGroup, beat_command, free_port, wait_http_ok, web_command, worker_command


def database_url_for_children() -> str:
    """A DATABASE_URL that points child processes at the database this test run uses."""
    db: dict[str, Any] = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


@dataclass
class Stack:
    """Handles to the running processes, with the fault injections tests need."""

    log_dir: Path
    group: ProcessGroup = field(init=False)
    port: int = field(default_factory=free_port)

    def __post_init__(self) -> None:
        env = dict(os.environ)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": "config.settings.test",
                "DATABASE_URL": database_url_for_children(),
                "REDIS_URL": settings.REDIS_URL,
                "FLOTILLA_DATA_DIR": str(settings.DATA_DIR),
                "PUBLIC_BASE_URL": f"http://127.0.0.1:{self.port}",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.group = ProcessGroup(env=env, log_dir=self.log_dir)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_web(self) -> None:
        web = self.group.start("web", web_command(port=self.port))
        wait_http_ok(f"{self.url}/healthz", process=web)

    def start_worker(self, name: str = "worker", *, concurrency: int = 2) -> None:
        self.group.start(name, worker_command(concurrency=concurrency, name=name))
        time.sleep(0.5)

    def start_beat(self) -> None:
        self.group.start("beat", beat_command(schedule_file=self.log_dir / "beat-schedule"))

    def kill(self, name: str) -> None:
        """SIGKILL a process, as a crash or OOM would."""
        child = self.group.children.pop(name, None)
        if child:
            child.kill()

    def restart_web(self) -> None:
        self.group.stop("web")
        self.start_web()

    def stop(self) -> None:
        self.group.stop_all()

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
