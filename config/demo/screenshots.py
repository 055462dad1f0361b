"""Screenshots of the dashboard's main pages from a running server.

    python -m config.demo.screenshots --url http://127.0.0.1:8000 --user admin --password PW \\
        --out docs/screenshots/
    python -m config.demo.screenshots --sample --out docs/screenshots/   # scratch sample fleet

Drives headless Chromium (Debian's /usr/bin/chromium through Playwright): signs in, then
captures the overview, the device list, the first device, the model report of the newest
evaluated version, the newest rollout and the newest federated job. A page whose list is
empty is skipped with a note. Against a running server it only speaks HTTP; `--sample`
seeds a scratch SQLite database (`config.demo.seed.seed_sample_fleet`) and serves it itself
(`config.stack.Stack`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

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


def _first_link(page: Any, selector: str) -> str | None:
    link = page.locator(selector).first
    if link.count() == 0:
        return None
    href: str | None = link.get_attribute("href")
    return href


def _shoot(page: Any, url: str, path: Path) -> None:
    page.goto(url)
    page.wait_for_load_state("networkidle")
    # Charts draw on the next frame after load.
    page.wait_for_timeout(400)
    page.screenshot(path=str(path), full_page=True)
    print(f"wrote {path}")


def capture(*, url: str, user: str, password: str, out: Path, width: int = 1440) -> list[Path]:
    """Sign in and write one PNG per main page into `out`; returns the files written."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    base = url.rstrip("/")
    written: list[Path] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900}, device_scale_factor=1)
            page.set_default_timeout(30_000)
            page.goto(f"{base}/login/")
            page.fill("input[name=username]", user)
            page.fill("input[name=password]", password)
            page.click("button[type=submit]")
            page.wait_for_url(f"{base}/")

            def shoot(name: str, target: str | None) -> None:
                if target is None:
                    print(f"skipped {name}: nothing to show yet")
                    return
                path = out / f"{name}.png"
                _shoot(page, target if target.startswith("http") else f"{base}{target}", path)
                written.append(path)

            shoot("overview", "/")
            shoot("devices", "/devices/")
            page.goto(f"{base}/devices/?status=online")
            shoot("device-detail", _first_link(page, "#devices a[href^='/devices/']"))
            page.goto(f"{base}/models/")
            family = _first_link(page, "main a[href^='/models/']:not([href='/models/'])")
            report = None
            if family:
                page.goto(f"{base}{family}")
                # The newest version with an accuracy figure has an evaluation report.
                rows = page.locator("#variants tr").all()
                for row in rows[1:]:
                    if "%" in row.inner_text():
                        report = row.locator("a").first.get_attribute("href")
                        break
            shoot("model-report", report)
            page.goto(f"{base}/rollouts/")
            shoot("rollout", _first_link(page, "main a[href^='/rollouts/']:not([href='/rollouts/'])"))
            page.goto(f"{base}/federated/")
            shoot("federated-job", _first_link(page, "main a[href^='/federated/']:not([href='/federated/'])"))
        finally:
            browser.close()
    return written


def sample_stack(*, out: Path, width: int) -> list[Path]:
    """Seed a scratch database with `seed_sample_fleet`, serve it with uvicorn, capture."""
    import secrets
    import tempfile

    from config.stack import Stack

    work = Path(tempfile.mkdtemp(prefix="flotilla-screenshots-"))
    # Always a scratch SQLite file, never the database DATABASE_URL names.
    with Stack(
        data_dir=work, settings="config.settings.demo", database_url=f"sqlite:///{work / 'flotilla.sqlite3'}"
    ) as stack:
        stack.migrate()
        stack.setup_django()
        from config.demo.seed import seed_sample_fleet

        password = secrets.token_urlsafe(12)
        seed_sample_fleet(admin_username="admin", admin_password=password)
        stack.start_web()
        return capture(url=stack.url, user="admin", password=password, out=out, width=width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Screenshots of the dashboard's main pages.")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument(
        "--sample", action="store_true", help="seed a scratch database with a sample fleet and serve it"
    )
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--width", type=int, default=1440)
    args = parser.parse_args(argv)
    if args.sample:
        sample_stack(out=args.out, width=args.width)
        return 0
    if not (args.url and args.user and args.password):
        parser.error("--url, --user and --password are needed (or --sample)")
    capture(url=args.url, user=args.user, password=args.password, out=args.out, width=args.width)
    return 0


if __name__ == "__main__":
    sys.exit(main())
