"""Browser fixtures: Debian's Chromium driven by Playwright (async API) against a real
``tillsync-central run`` (workers and the admin dashboard) on a fresh vhost and database,
with real register agents.

Chromium comes from ``$TILLSYNC_CHROMIUM`` or ``chromium`` on the PATH (``deploy/dev/test``
installs it); without it these tests FAIL with that message, they never skip. It runs
headless with ``--no-sandbox`` (CI runs as root).
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright

from e2e.conftest import Central, wait_for
from services import RabbitApi, Services
from tillsync_central.management import Management, vhost_of

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
async def dashboard(
    services: Services,
    rabbitmq_api: RabbitApi,
    fresh_vhost: str,
    make_database: Any,
    tmp_path: Path,
) -> AsyncIterator[Dashboard]:
    """``tillsync-central run`` with its dashboard on a free port, heartbeats every second
    (a register is offline after 3 s), and one administrator."""
    import asyncpg

    database_url = await make_database()
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
    management = Management(services.rabbitmq_api_url, vhost_of(fresh_vhost))
    port = free_port()
    instance = Central(
        amqp_url=fresh_vhost,
        database_url=database_url,
        api_url=services.rabbitmq_api_url,
        api=rabbitmq_api,
        log_path=tmp_path / "central.log",
        pool=pool,
        management=management,
        extra_env={
            "TILLSYNC_ADMIN_PORT": str(port),
            "TILLSYNC_HEARTBEAT_INTERVAL_S": "1",
            "TILLSYNC_ADMIN_QUEUE_SAMPLE_S": "1",
        },
    )
    try:
        await instance.start()
        await _add_operator(instance)
        yield Dashboard(instance, f"http://127.0.0.1:{port}")
    finally:
        await instance.stop()
        for enrollment in instance.enrollments.values():
            await management.delete_user(enrollment.broker_user)
        await management.aclose()
        await pool.close()
        await make_database.drop(database_url)


async def _add_operator(central: Central) -> None:
    import asyncio
    import subprocess

    from e2e.conftest import BIN

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
