"""The server stack on one machine: one environment, the processes that share it.

`make demo`, the test suite's `live_stack` fixture, the benchmarks and the screenshot
tool all start their servers through `Stack`. It assembles the environment the
processes share (settings module, database, Redis-protocol server, data directory,
public URL, heartbeat interval, and for production settings the secrets they demand),
migrates when asked, sets Django up in the calling process on the same database, and
starts, kills and restarts named processes: the web server (uvicorn, or gunicorn for
the WSGI comparison), Celery workers, beat, anything else. Each process logs to
`<log_dir>/<name>.log`.

    with Stack.scratch("flotilla-bench-", production=True) as stack:
        stack.migrate()
        stack.setup_django()
        stack.start_web(workers=2)
        stack.start_worker("bench", concurrency=1)
        ...
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from config.embedded_redis import EmbeddedRedis
from config.env import BASE_DIR
from config.runner import (
    ALL_QUEUES,
    Managed,
    ProcessGroup,
    beat_command,
    free_port,
    wait_http_ok,
    web_command,
    worker_command,
    wsgi_command,
)

WebServer = Literal["uvicorn", "gunicorn"]


def database_url_of(db: Mapping[str, Any]) -> str:
    """A DATABASE_URL for one entry of Django's DATABASES (children reach the same database)."""
    if db["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{db['NAME']}"
    user = db.get("USER") or "postgres"
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    host = db.get("HOST") or "127.0.0.1"
    port = db.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{db['NAME']}"


def _production_secrets() -> dict[str, str]:
    """What the production settings module refuses to start without, made up for this stack."""
    from cryptography.fernet import Fernet

    return {
        "DJANGO_SECRET_KEY": "local-stack-only-secret-key-" + "x" * 30,
        "DEVICE_SECRET_KEY": "local-stack-only-device-key",
        "PROVISIONING_KEY": Fernet.generate_key().decode(),
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "DJANGO_SECURE_COOKIES": "0",
        # The stack serves plain HTTP on loopback, with no TLS proxy in front.
        "DJANGO_SECURE_SSL_REDIRECT": "0",
        "DJANGO_HSTS_SECONDS": "0",
    }


@dataclass
class Stack:
    """The shared environment and the processes started in it.

    ``database_url``: None means ``DATABASE_URL`` when set, else a SQLite file in the data
    directory (the settings' own default). ``redis_url``: None means ``REDIS_URL`` when
    set, else an embedded server (``config.embedded_redis``) that the stack stops on
    `close`. ``public_base_url``: None means the web server's own URL. ``extra_env`` is
    applied last and wins over everything.
    """

    data_dir: Path
    settings: str = "config.settings.demo"
    log_dir: Path | None = None
    database_url: str | None = None
    redis_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    public_base_url: str | None = None
    heartbeat_interval_s: int | None = None
    production_secrets: bool = False
    log_level: str | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)

    env: dict[str, str] = field(init=False)
    group: ProcessGroup = field(init=False)
    embedded_redis: EmbeddedRedis | None = field(init=False, default=None)
    _web_options: dict[str, Any] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = Path(self.log_dir) if self.log_dir else self.data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        self.database_url = (
            self.database_url
            or os.environ.get("DATABASE_URL")
            or f"sqlite:///{self.data_dir / 'flotilla.sqlite3'}"
        )
        if not self.redis_url:
            self.redis_url = os.environ.get("REDIS_URL") or ""
        if not self.redis_url:
            from config.embedded_redis import start

            self.embedded_redis = start(workdir=self.data_dir / "valkey")
            self.redis_url = self.embedded_redis.url
        env = dict(os.environ)
        env.update(
            {
                "DJANGO_SETTINGS_MODULE": self.settings,
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "FLOTILLA_DATA_DIR": str(self.data_dir),
                "PUBLIC_BASE_URL": self.public_base_url or self.url,
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.heartbeat_interval_s is not None:
            env["HEARTBEAT_INTERVAL_S"] = str(self.heartbeat_interval_s)
        if self.production_secrets:
            env.update(_production_secrets())
        if self.log_level:
            env["LOG_LEVEL"] = self.log_level
        env.update(self.extra_env)
        self.env = env
        self.group = ProcessGroup(env=env, log_dir=self.log_dir)

    @classmethod
    def scratch(cls, prefix: str, *, production: bool = False, **options: Any) -> Stack:
        """A stack on a fresh temporary data directory.

        ``production``: the production settings module with made-up secrets and warning-level
        logs, the configuration the benchmarks measure.
        """
        if production:
            options.setdefault("settings", "config.settings.production")
            options.setdefault("production_secrets", True)
            options.setdefault("log_level", "WARNING")
        return cls(data_dir=Path(tempfile.mkdtemp(prefix=prefix)), **options)

    # -- what the processes share ---------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def database(self) -> str:
        """The database's kind: ``sqlite``, ``postgres``, ..."""
        url = self.database_url or ""
        return "sqlite" if url.startswith("sqlite") else url.split(":", 1)[0]

    def migrate(self) -> None:
        """Apply migrations to the stack's database (in a child process, with its environment)."""
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
            env=self.env,
            check=True,
            cwd=BASE_DIR,
        )

    def setup_django(self) -> None:
        """Give this process the stack's environment and set Django up on it.

        The caller then writes rows with the ORM and services, on the database the server
        processes use.
        """
        os.environ.update(self.env)
        import django

        django.setup()

    # -- processes ------------------------------------------------------------------------

    def start(self, name: str, command: list[str], *, extra_env: Mapping[str, str] | None = None) -> Managed:
        """Start any command in the stack's environment, logging to ``<name>.log``."""
        return self.group.start(name, command, extra_env=extra_env)

    def start_web(
        self,
        *,
        server: WebServer = "uvicorn",
        workers: int = 1,
        threads: int = 4,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> Managed:
        """The web server as ``web``; ``wait`` until ``/healthz`` answers (see `wait_web`).

        ``uvicorn`` is the ASGI server production runs; ``gunicorn`` serves the WSGI
        application with ``threads`` threads per worker.
        """
        self._web_options = {"server": server, "workers": workers, "threads": threads, "timeout": timeout}
        if server == "uvicorn":
            command = web_command(port=self.port, host=self.host, workers=workers)
        else:
            command = wsgi_command(port=self.port, host=self.host, workers=workers, threads=threads)
        web = self.start("web", command)
        if wait:
            self.wait_web(timeout=timeout)
        return web

    def wait_web(self, *, timeout: float = 60.0) -> None:
        """Wait until the web server answers ``/healthz``, failing early if it died."""
        wait_http_ok(f"{self.url}/healthz", process=self.group.children.get("web"), timeout=timeout)

    def restart_web(self) -> Managed:
        """Stop the web server and start it again with the same options."""
        self.stop("web")
        return self.start_web(**self._web_options)

    def start_worker(
        self,
        name: str = "worker",
        *,
        concurrency: int = 2,
        queues: str = ALL_QUEUES,
        extra_env: Mapping[str, str] | None = None,
    ) -> Managed:
        """A Celery worker named ``name`` (its hostname is ``<name>@<host>``), consuming
        ``queues`` (every queue by default: ``control``, ``ml`` and ``io``)."""
        command = worker_command(concurrency=concurrency, queues=queues, name=name)
        return self.start(name, command, extra_env=extra_env)

    def start_beat(
        self, *, schedule_file: Path | None = None, extra_env: Mapping[str, str] | None = None
    ) -> Managed:
        """Celery beat as ``beat``; its schedule file lives in the data directory."""
        schedule = schedule_file or self.data_dir / "celerybeat-schedule"
        return self.start("beat", beat_command(schedule_file=schedule), extra_env=extra_env)

    def stop(self, name: str, *, timeout: float = 10.0) -> None:
        """SIGTERM one process, SIGKILL it if it is still up after ``timeout``."""
        self.group.stop(name, timeout=timeout)

    def kill(self, name: str) -> None:
        """SIGKILL one process, as a crash or the OOM killer would."""
        child = self.group.children.pop(name, None)
        if child:
            child.kill()

    def reap(self) -> list[Managed]:
        """The processes that exited on their own since the last call (then forgotten)."""
        exited = [child for child in self.group.children.values() if not child.running]
        for child in exited:
            self.group.children.pop(child.name, None)
        return exited

    def log_path(self, name: str) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{name}.log"

    def log(self, name: str = "web") -> str:
        """Everything process ``name`` wrote so far ('' when it never ran)."""
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Stop every process, then the embedded Redis-protocol server if this stack started one."""
        self.group.stop_all()
        if self.embedded_redis is not None:
            self.embedded_redis.stop()
            self.embedded_redis = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
