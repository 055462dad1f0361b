"""The dashboard in a real headless Chromium against the live stack (uvicorn + Celery worker).

Pages must update without reloading: devices appear as agents enroll over real HTTP, a
rollout's waves advance, a federated job's new round shows up; and no page logs an error.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any, TypeVar

import httpx
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "pw-Flotilla-1"  # noqa: S105
T = TypeVar("T")


@pytest.fixture
def browser() -> Iterator[Any]:
    # A missing browser fails loudly: `make test` installs it, and a skipped browser test
    # would prove nothing.
    assert os.path.exists(CHROMIUM), "chromium is not installed: run `bash scripts/system-deps.sh`"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield instance
        finally:
            instance.close()


def off_loop(fn: Callable[[], T]) -> T:
    """Run ORM and service calls on another thread.

    Playwright's sync API keeps an event loop running on the test's thread, where Django
    refuses database access and `async_to_sync` (used to publish events) cannot run.
    """

    def call() -> T:
        from django.db import connection

        try:
            return fn()
        finally:
            connection.close()

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(call).result()


class Session:
    """A signed-in page that records every console error and uncaught exception."""

    def __init__(self, browser: Any, base_url: str) -> None:
        self.base_url = base_url
        self.errors: list[str] = []
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.page.on("console", lambda msg: self.errors.append(msg.text) if msg.type == "error" else None)
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def login(self, username: str) -> None:
        self.page.goto(f"{self.base_url}/login/")
        self.page.fill("input[name=username]", username)
        self.page.fill("input[name=password]", PASSWORD)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(f"{self.base_url}/")

    def open(self, path: str) -> None:
        self.page.goto(f"{self.base_url}{path}")
        # The socket is open: from now on changes arrive as events, not by polling.
        self.page.wait_for_selector("#live-indicator[data-state=live]")


def make_operator() -> Any:
    from django.contrib.auth.models import Group, User

    # transactional_db starts from an empty database: recreate the role groups.
    for role in ("viewer", "operator", "admin"):
        Group.objects.get_or_create(name=role)
    user = User.objects.create_user(username="ops", password=PASSWORD)
    user.groups.add(Group.objects.get(name="operator"))
    return user


def make_release() -> tuple[Any, Any, Any]:
    """A digits family with a running version (production) and a candidate (staging),
    registered with all three artifacts and promoted through the registry."""
    from models_registry.services import version_promote
    from tests.bundles import digits_family, digits_version

    family = digits_family("digits")
    base = digits_version(family)
    candidate = digits_version(family, parent=base)
    for stage in ("staging", "production"):
        base = version_promote(version=base, stage=stage)
    candidate = version_promote(version=candidate, stage="staging")
    return family, base, candidate


def make_regression_release() -> tuple[Any, Any]:
    """A regression family with a version judged on the boards' holdouts."""
    from models_registry.models import ModelVersion
    from tests.bundles import regression_family, regression_version

    family = regression_family()
    version = regression_version(family)
    spread = {
        "metric": "mae",
        "value": 0.4,
        "devices": 3,
        "examples": 60,
        "min": 0.3,
        "max": 0.5,
        "std": 0.08,
    }
    ModelVersion.objects.filter(pk=version.pk).update(
        metrics={"mae": 0.4, "evaluation": "federated", "federated_evaluation": spread}
    )
    return family, version


def test_devices_appear_as_agents_enroll(live_stack: Any, transactional_db: Any, browser: Any) -> None:
    from django.utils import timezone

    from fleet.services.enrollment import enrollment_token_create

    off_loop(make_operator)
    session = Session(browser, live_stack.url)
    session.login("ops")
    session.open("/devices/")
    assert session.page.locator("#devices").inner_text().count("browser-cam") == 0
    _, token = off_loop(
        lambda: enrollment_token_create(
            actor=None, max_uses=5, expires_at=timezone.now() + timedelta(hours=1)
        )
    )
    for name in ("browser-cam-1", "browser-cam-2"):
        response = httpx.post(
            f"{live_stack.url}/api/agent/v1/enroll",
            json={"token": token, "name": name, "hardware": {"arch": "aarch64", "cores": 4, "ram_mb": 1024}},
            timeout=10,
        )
        assert response.status_code in (200, 201), response.text
    session.page.wait_for_selector("#devices >> text=browser-cam-1")
    session.page.wait_for_selector("#devices >> text=browser-cam-2")
    # The overview counts them too.
    session.open("/")
    assert session.page.inner_text("#count-total") == "2"
    assert session.errors == []


def _rollout_setup() -> Any:
    from django.utils import timezone

    from fleet.models import Device, DeviceGroup
    from fleet.services.rollouts import rollout_create

    user = make_operator()
    _, base, candidate = make_release()
    # A canary group: the candidate is in staging.
    group = DeviceGroup.objects.create(name="browser-fleet", canary=True)
    for i in range(2):
        device = Device.objects.create(
            name=f"rollout-cam-{i}", status="online", last_seen=timezone.now(), running_version=base
        )
        device.groups.add(group)
    return rollout_create(
        actor=user,
        data={
            "name": "v2 to the browser fleet",
            "version": candidate.pk,
            "target_group": group.pk,
            "waves": [{"percent": 50, "soak_s": 0}, {"percent": 100, "soak_s": 0}],
        },
    )


def _first_wave_succeeds(rollout_id: int) -> int:
    """The first wave's device installs the version and reports it active, as its agent would."""
    from fleet.models import Rollout, RolloutDevice
    from fleet.services.deployments import deployment_record_status
    from fleet.services.rollouts import rollout_advance

    member = RolloutDevice.objects.select_related("device").get(rollout_id=rollout_id, wave=0)
    assert member.deployment_id is not None
    for state in ("downloading", "verifying", "installing", "health_check", "active"):
        deployment_record_status(device=member.device, deployment_id=member.deployment_id, state=state)
    rollout_advance(rollout_id=rollout_id)
    return Rollout.objects.get(pk=rollout_id).current_wave


def test_rollout_advances_live(live_stack: Any, transactional_db: Any, browser: Any) -> None:
    rollout = off_loop(_rollout_setup)
    session = Session(browser, live_stack.url)
    session.login("ops")
    session.open(f"/rollouts/{rollout.pk}/")
    session.page.click("button:has-text('Start')")
    session.page.wait_for_selector("#rollout-status:has-text('running')")
    session.page.wait_for_selector("#live-indicator[data-state=live]")
    session.page.wait_for_selector('tr[data-wave="1"][data-phase="current"]')

    assert off_loop(lambda: _first_wave_succeeds(rollout.pk)) == 1

    # No reload: the wave-started event refreshes the page.
    session.page.wait_for_selector('tr[data-wave="2"][data-phase="current"]')
    session.page.wait_for_selector('#rollout-wave:has-text("2 / 2")')
    session.page.wait_for_selector("#decisions >> text=wave_started")
    assert session.errors == []


def _job_setup() -> Any:
    from fleet.models import DeviceGroup
    from training.models import FederatedJob, FederatedRound

    make_operator()
    family, base, _ = make_release()
    group = DeviceGroup.objects.create(name="trainers")
    job = FederatedJob.objects.create(
        name="browser job",
        family=family,
        base_version=base,
        target_group=group,
        status="running",
        current_round=1,
    )
    FederatedRound.objects.create(
        job=job, number=1, base_version=base, status="done", participants=3, accuracy=0.81, loss=0.6
    )
    return job


def _open_round_two(job_id: int) -> None:
    """A worker opens round 2 and announces it the way the training services do."""
    from core.events import emit
    from training.models import FederatedJob, FederatedRound

    job = FederatedJob.objects.get(pk=job_id)
    FederatedRound.objects.create(
        job=job, number=2, base_version_id=job.base_version_id, status="collecting", selected=["a", "b"]
    )
    FederatedJob.objects.filter(pk=job_id).update(current_round=2)
    emit("federated_round.status", {"job": job_id, "round": 2, "status": "collecting"})


def test_federated_round_arrives_live(live_stack: Any, transactional_db: Any, browser: Any) -> None:
    job = off_loop(_job_setup)
    session = Session(browser, live_stack.url)
    session.login("ops")
    session.open(f"/federated/{job.pk}/")
    session.page.wait_for_selector('#rounds tr[data-round="1"]')
    assert session.page.locator('#rounds tr[data-round="2"]').count() == 0

    off_loop(lambda: _open_round_two(job.pk))

    session.page.wait_for_selector('#rounds tr[data-round="2"] >> text=collecting')
    session.page.wait_for_selector('#job-round:has-text("2 / 10")')
    assert session.errors == []


def test_pages_render_without_console_errors(live_stack: Any, transactional_db: Any, browser: Any) -> None:
    def setup() -> tuple[Any, Any]:
        make_operator()
        make_release()
        return make_regression_release()

    family, version = off_loop(setup)
    session = Session(browser, live_stack.url)
    session.login("ops")
    for path in (
        "/",
        "/devices/",
        "/models/",
        f"/models/{family.pk}/",
        f"/versions/{version.pk}/",
        "/rollouts/",
        "/experiments/",
        "/federated/",
        "/provisioning/",
    ):
        session.page.goto(f"{live_stack.url}{path}")
        session.page.wait_for_load_state("networkidle")
    session.page.goto(f"{live_stack.url}/enrollment/")
    session.page.click("button:has-text('Create token')")
    session.page.wait_for_selector("#new-token-command")
    assert "flotilla-agent" in session.page.inner_text("#new-token-command")
    assert session.errors == []
