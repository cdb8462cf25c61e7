"""Browser fixtures: Debian's Chromium driven by Playwright (async API) against a real
``tillsync-central run`` (workers and the admin dashboard) on a fresh vhost and database,
with real register agents.

Chromium comes from ``$TILLSYNC_CHROMIUM`` or ``chromium`` on the PATH (``deploy/dev/test``
installs it); without it these tests FAIL with that message, they never skip. It runs
headless with ``--no-sandbox`` (CI runs as root).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from e2e.conftest import BIN, Central, wait_for
from e2e.conftest import central as central  # the fixture, with central_env below

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "docs" / "img"
OPERATOR = "ops-admin"
PASSWORD = "a browser test password"


@dataclass
class Dashboard:
    """A running central (workers and dashboard) and the dashboard's URL."""

    central: Central
    url: str


def chromium_path() -> str:
    path = os.environ.get("TILLSYNC_CHROMIUM") or shutil.which("chromium")
    if not path or not Path(path).exists():
        pytest.fail(
            "Chromium is missing: install Debian's 'chromium' package (deploy/dev/test does) "
            "or point TILLSYNC_CHROMIUM at a Chromium binary",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    executable = chromium_path()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=["--no-sandbox"]
        )
        yield launched
        await launched.close()


@pytest.fixture
def central_env() -> dict[str, str]:
    """The e2e ``central`` fixture's process, with its dashboard on a free port and
    heartbeats every second (a register is offline after 3 s)."""
    return {
        "TILLSYNC_ADMIN_PORT": str(free_port()),
        "TILLSYNC_HEARTBEAT_INTERVAL_S": "1",
        "TILLSYNC_ADMIN_QUEUE_SAMPLE_S": "1",
        "TILLSYNC_RECONCILE_INTERVAL_S": "1",
    }


@pytest.fixture
async def dashboard(central: Central) -> Dashboard:
    """A running ``tillsync-central run`` (workers and dashboard) with one administrator
    (the ``central`` fixture deletes the registers' broker users afterwards)."""
    await _add_operator(central)
    return Dashboard(central, f"http://127.0.0.1:{central.extra_env['TILLSYNC_ADMIN_PORT']}")


async def _add_operator(central: Central) -> None:
    env = {**central.env(), "TILLSYNC_OPERATOR_PASSWORD": PASSWORD}
    done = await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "tillsync-central"), "users", "add", OPERATOR, "--role", "administrator"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.fixture
async def context(browser: Browser, dashboard: Dashboard) -> AsyncIterator[BrowserContext]:
    made = await browser.new_context(
        base_url=dashboard.url, viewport={"width": 1400, "height": 900}
    )
    yield made
    await made.close()


async def log_in(page: Page, username: str = OPERATOR, password: str = PASSWORD) -> None:
    await page.goto("/fleet")
    await page.get_by_test_id("login-username").fill(username)
    await page.get_by_test_id("login-password").fill(password)
    await page.get_by_test_id("login-submit").click()
    await page.wait_for_url("**/fleet")


async def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=False)


__all__ = ["Dashboard", "log_in", "screenshot", "wait_for"]
