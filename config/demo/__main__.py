"""`make demo`: the whole system on one machine, with nothing installed but Python.

    python -m config.demo                      # the demo (what `make demo` runs)
    python -m config.demo seed [--examples N] [--seed S]

SQLite (WAL) and an embedded Redis-protocol server unless DATABASE_URL / REDIS_URL are
set; then the ASGI server, a Celery worker and beat, a seeded model, and a simulated fleet
of DEMO_DEVICES agents that enroll, run the model, report metrics and train federated
rounds. Ctrl-C stops everything.

`seed` only registers the demo models and data sets (`config.demo.seed.seed_demo`,
idempotent) on the database of the settings in DJANGO_SETTINGS_MODULE (default
`config.settings.demo`), which must be migrated.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import time
from pathlib import Path
from typing import Any

from config.env import BASE_DIR

DATA_DIR = Path(os.environ.get("FLOTILLA_DATA_DIR", BASE_DIR / "var"))
PORT = int(os.environ.get("PORT", "8000"))
DEVICES = int(os.environ.get("DEMO_DEVICES", "12"))
# The second family's boards: each a `flotilla-agent run` process with an application
# beside it that talks to the agent over its local API socket.
ACTIVITY_BOARDS = int(os.environ.get("DEMO_ACTIVITY_BOARDS", "4"))
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


def run_demo() -> None:
    from config.demo.seed import (
        ACTIVITY_FAMILY,
        seed_activity_family,
        seed_activity_fleet,
        seed_demo,
        start_federated_job_when_online,
    )
    from config.stack import Stack

    # What the environment already says wins: another settings module, a public URL
    # for real boards on the network, a slower heartbeat.
    stack = Stack(
        data_dir=DATA_DIR,
        settings=os.environ.get("DJANGO_SETTINGS_MODULE", "config.settings.demo"),
        log_dir=DATA_DIR / "logs",
        port=PORT,
        public_base_url=os.environ.get("PUBLIC_BASE_URL"),
        # The demo moves fast so a newcomer sees things happen: heartbeats every 5 s.
        heartbeat_interval_s=int(os.environ.get("HEARTBEAT_INTERVAL_S", "5")),
        extra_env={"DJANGO_ALLOWED_HOSTS": os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost")},
    )
    if stack.embedded_redis is not None:
        say(f"embedded Redis-protocol server on {stack.redis_url}")
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            say("stopping ...")
            stack.close()
            sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)

    say("migrating the database ...")
    stack.migrate()
    password = _admin_password()
    stack.setup_django()
    seeded = seed_demo(admin_username=ADMIN_USER, admin_password=password, devices=DEVICES, say=say)

    stack.start_web(workers=1, wait=False)
    stack.start_worker(concurrency=2)  # one worker on every queue (control, ml, io)
    stack.start_beat()
    stack.wait_web()

    url = stack.url
    say("")
    say(f"Flotilla is running at {url}/")
    say(f"  dashboard login: {ADMIN_USER} / {password}")
    say(f"  API docs:        {url}/api/docs/")
    say(f"  API token:       curl -H 'Authorization: Token {seeded['api_token']}' {url}/api/v1/devices/")
    say(f"  logs:            {stack.log_dir}/")
    say("")

    if DEVICES > 0:
        say(f"starting a simulated fleet of {DEVICES} devices ...")
        stack.start(
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
        start_federated_job_when_online(devices=DEVICES, group_name=seeded["group"], say=say)

    if ACTIVITY_BOARDS > 0:
        from django.contrib.auth.models import User

        say("registering the second family (activity, a 1-D CNN) through the REST API ...")
        version_id = seed_activity_family(url=url, api_token=seeded["api_token"], say=say)
        boards = seed_activity_fleet(devices=ACTIVITY_BOARDS, actor=User.objects.get(username=ADMIN_USER))
        say(f"activity v{version_id} is in production; {ACTIVITY_BOARDS} boards start as agent processes")
        stack.start(
            "activity-boards",
            [
                sys.executable,
                "-m",
                "devices_agent",
                "simulate",
                "--dataset",
                "activity",
                "--processes",
                "--devices",
                str(ACTIVITY_BOARDS),
                "--server",
                url,
                "--token",
                boards["enrollment_token"],
                "--state-root",
                str(DATA_DIR / "activity-boards"),
                "--interval",
                os.environ.get("HEARTBEAT_INTERVAL_S", "5"),
                "--slow-fraction",
                "0",
            ],
        )
        start_federated_job_when_online(
            devices=ACTIVITY_BOARDS,
            group_name=boards["group"],
            family_name=ACTIVITY_FAMILY,
            min_examples=60,
            job={
                "name": "activity federated training",
                "rounds": 10,
                "local_epochs": 3,
                "round_deadline_s": 90,
            },
            say=say,
        )

    say("press Ctrl-C to stop")
    while True:
        for child in stack.reap():
            say(f"{child.name} exited; see {child.log_path}")
        time.sleep(2)


def run_seed(*, examples: int, seed: int) -> None:
    """Register the demo models and data sets; print what is there."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings.demo")
    from django.apps import apps

    if not apps.ready:
        import django

        django.setup()
    from config.demo.seed import registry_seed_demo, registry_seed_demo_cnn

    version = registry_seed_demo(examples=examples, seed=seed)
    print(f"{version.label} is in {version.stage} (id {version.pk})")
    # Already seeded by registry_seed_demo: this only reads it back for the report.
    cnn = registry_seed_demo_cnn(examples=examples, seed=seed)
    print(f"{cnn.label} is in {cnn.stage} (id {cnn.pk})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m config.demo", description="The whole system on this machine with a simulated fleet."
    )
    commands = parser.add_subparsers(dest="command")
    seed = commands.add_parser(
        "seed",
        help="register the demo models and data sets (idempotent)",
        description=(
            "Train the digits MLP and CNN on a small public slice and register them as "
            "digits-mlp (production) and digits-cnn (staging), with the digits data sets."
        ),
    )
    seed.add_argument("--examples", type=int, default=300, help="training examples (default 300)")
    seed.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "seed":
        run_seed(examples=args.examples, seed=args.seed)
    else:
        run_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
