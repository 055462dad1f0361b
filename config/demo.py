"""`make demo`: the whole system on one machine, with nothing installed but Python.

SQLite (WAL) and an embedded Redis-protocol server unless DATABASE_URL / REDIS_URL are
set; then the ASGI server, a Celery worker and beat, a seeded model, and a simulated fleet
of DEMO_DEVICES agents that enroll, run the model, report metrics and train federated
rounds. Ctrl-C stops everything.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from config.env import BASE_DIR

DATA_DIR = Path(os.environ.get("FLOTILLA_DATA_DIR", BASE_DIR / "var"))
PORT = int(os.environ.get("PORT", "8000"))
DEVICES = int(os.environ.get("DEMO_DEVICES", "12"))
ADMIN_USER = os.environ.get("DEMO_ADMIN_USER", "admin")


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def _admin_password() -> str:
    """A random admin password, generated once and kept so restarts print the same one."""
    path = DATA_DIR / "admin-password.txt"
    if path.exists():
        return path.read_text().strip()
    password = secrets.token_urlsafe(12)
    path.write_text(password + "\n")
    path.chmod(0o600)
    return password


def _prepare_environment() -> dict[str, str]:
    from config.embedded_redis import start

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.demo")
    os.environ.setdefault("FLOTILLA_DATA_DIR", str(DATA_DIR))
    os.environ.setdefault("PUBLIC_BASE_URL", f"http://127.0.0.1:{PORT}")
    os.environ.setdefault("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")
    # The demo moves fast so a newcomer sees things happen: heartbeats every 5 s.
    os.environ.setdefault("HEARTBEAT_INTERVAL_S", "5")
    if not os.environ.get("REDIS_URL"):
        server = start(workdir=DATA_DIR / "valkey")
        os.environ["REDIS_URL"] = server.url
        say(f"embedded Redis-protocol server on {server.url}")
    return dict(os.environ)


def _seed(password: str) -> dict[str, Any]:
    """Create the admin, the demo model and an enrollment token for the simulated fleet."""
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from rest_framework.authtoken.models import Token

    admin, created = User.objects.get_or_create(
        username=ADMIN_USER, defaults={"is_superuser": True, "is_staff": True}
    )
    if created or not admin.check_password(password):
        admin.set_password(password)
        admin.is_superuser = admin.is_staff = True
        admin.save()
    admin.groups.add(Group.objects.get(name="admin"))
    token, _ = Token.objects.get_or_create(user=admin)

    say("seeding the demo model family (digits MLP) ...")
    call_command("registry_seed_demo")
    from config.demo_seed import seed_fleet

    fleet = seed_fleet(devices=DEVICES, actor=admin)
    return {"api_token": token.key, **fleet}


def main() -> None:
    env = _prepare_environment()
    from config.runner import ProcessGroup, beat_command, wait_http_ok, web_command, worker_command

    say("migrating the database ...")
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], check=True, cwd=BASE_DIR, env=env
    )
    password = _admin_password()
    seeded = _seed(password)

    log_dir = DATA_DIR / "logs"
    log_dir.mkdir(exist_ok=True)
    group = ProcessGroup(env=env, log_dir=log_dir)
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            say("stopping ...")
            group.stop_all()
            sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    web = group.start("web", web_command(port=PORT, workers=1))
    group.start("worker", worker_command(concurrency=2))
    group.start("beat", beat_command(schedule_file=DATA_DIR / "celerybeat-schedule"))
    wait_http_ok(f"http://127.0.0.1:{PORT}/healthz", process=web)

    url = f"http://127.0.0.1:{PORT}"
    say("")
    say(f"Flotilla is running at {url}/")
    say(f"  dashboard login: {ADMIN_USER} / {password}")
    say(f"  API docs:        {url}/api/docs/")
    say(f"  API token:       curl -H 'Authorization: Token {seeded['api_token']}' {url}/api/v1/devices/")
    say(f"  logs:            {log_dir}/")
    say("")

    if DEVICES > 0:
        say(f"starting a simulated fleet of {DEVICES} devices ...")
        group.start(
            "agents",
            [
                sys.executable,
                "-m",
                "devices_agent",
                "simulate",
                "--devices",
                str(DEVICES),
                "--server",
                url,
                "--token",
                seeded["enrollment_token"],
                "--state-root",
                str(DATA_DIR / "fleet"),
            ],
        )
        from config.demo_seed import start_federated_job_when_online

        start_federated_job_when_online(devices=DEVICES, group_name=seeded["group"], say=say)

    say("press Ctrl-C to stop")
    while True:
        for name, child in list(group.children.items()):
            if not child.running:
                say(f"{name} exited; see {child.log_path}")
                group.children.pop(name)
        time.sleep(2)


if __name__ == "__main__":
    main()
