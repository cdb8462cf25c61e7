"""End-to-end fixtures: a real central (``tillsync-central run`` as a subprocess) on a
fresh vhost and database, registers provisioned through the real management API, and
register agents in-process or as real ``tillsync-agent run`` subprocesses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest

from services import RabbitApi, Services
from tillsync_agent import Agent, AgentSettings, load_settings
from tillsync_central.management import Management, vhost_of
from tillsync_central.provisioning import Enrollment, add_register
from tillsync_protocol import topology

BIN = Path(sys.executable).parent


async def queue_consumers(api: RabbitApi, amqp_url: str, queue: str) -> int:
    """Consumers of ``queue`` in ``amqp_url``'s vhost, from the management API (0 if absent)."""
    path = f"/api/queues/{quote(vhost_of(amqp_url), safe='')}/{quote(queue, safe='')}"
    async with httpx.AsyncClient(base_url=api.base_url, auth=api.auth, timeout=10) as client:
        response = await client.get(path)
    if response.status_code != 200:
        return 0
    return int(response.json().get("consumers", 0))


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float, what: str, interval: float = 0.1
) -> None:
    """Wait until ``predicate()`` is true, or fail the test naming what did not happen."""
    deadline = time.monotonic() + timeout
    while True:
        if await predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


@dataclass
class Central:
    """A running central: the real CLI in a subprocess, and direct access to its database."""

    amqp_url: str
    database_url: str
    api_url: str
    api: RabbitApi
    log_path: Path
    pool: asyncpg.Pool
    management: Management
    process: subprocess.Popen[bytes] | None = None
    enrollments: dict[str, Enrollment] = field(default_factory=dict)
    extra_env: dict[str, str] = field(default_factory=dict)
    """More ``TILLSYNC_*`` settings for the process (a module's ``central_env`` fixture)."""

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TILLSYNC_AMQP_URL": self.amqp_url,
            "TILLSYNC_DATABASE_URL": self.database_url,
            "TILLSYNC_RABBITMQ_API_URL": self.api_url,
            "TILLSYNC_LOG_FORMAT": "json",
            **self.extra_env,
        }

    @property
    def metrics_url(self) -> str:
        """``/metrics`` of the process (``central_env`` must set ``TILLSYNC_METRICS_PORT``)."""
        port = self.extra_env["TILLSYNC_METRICS_PORT"]
        return f"http://127.0.0.1:{port}/metrics"

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = await asyncio.to_thread(
                subprocess.Popen,
                [str(BIN / "tillsync-central"), "run"],
                env=self.env(),
                stdout=log,
                stderr=log,
            )
        await wait_for(self._consuming, timeout=60, what="central's ingest workers to consume")

    async def _consuming(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"tillsync-central run exited {self.process.returncode}: {self.log()}"
            )
        return await queue_consumers(self.api, self.amqp_url, topology.INGEST_QUEUE) > 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    async def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        for _ in range(300):
            if self.process.poll() is not None:
                return self.process.returncode
            await asyncio.sleep(0.1)
        self.process.kill()
        raise AssertionError("tillsync-central did not stop within 30 s of SIGTERM")

    async def delete_broker_users(self) -> None:
        """Broker users are not per vhost: the registers' users go with the test, or every
        run would leave its ones (``reg-r-hole-<run>``…) on the broker. (Tests name their
        registers with ``register_ids.reg``, so that sessions never share one.)"""
        for enrollment in self.enrollments.values():
            await self.management.delete_user(enrollment.broker_user)

    async def provision(self, center_id: str, register_id: str) -> Enrollment:
        enrollment = await add_register(
            self.pool, self.management, self.amqp_url, center_id, register_id
        )
        self.enrollments[register_id] = enrollment
        return enrollment

    def ingested(self) -> tuple[int, int]:
        """Deliveries and documents of every ingest batch this process logged: a
        ``document_batch`` is one delivery of several documents."""
        deliveries = documents = 0
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"batch committed"' in line:
                event = json.loads(line)
                deliveries += int(event["size"])
                documents += int(event["documents"])
        return deliveries, documents

    async def stored(self, register_id: str | None = None) -> int:
        if register_id is None:
            return int(await self.pool.fetchval("SELECT count(*) FROM documents"))
        return int(
            await self.pool.fetchval(
                "SELECT count(*) FROM documents WHERE register_id = $1", register_id
            )
        )

    async def seqs(self, register_id: str) -> list[int]:
        rows = await self.pool.fetch(
            "SELECT seq FROM documents WHERE register_id = $1 ORDER BY seq", register_id
        )
        return [row["seq"] for row in rows]


@pytest.fixture
def central_env() -> dict[str, str]:
    """Extra ``TILLSYNC_*`` variables for ``central``; override it in a test module."""
    return {}


async def new_central(
    cleanup: contextlib.AsyncExitStack,
    services: Services,
    rabbitmq_api: RabbitApi,
    *,
    amqp_url: str,
    database_url: str,
    log_path: Path,
    extra_env: dict[str, str],
    pool_size: int = 4,
) -> Central:
    """A :class:`Central`, not started, whose pool, management client and registers'
    broker users go with ``cleanup`` (stopping or killing its process is the caller's)."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=pool_size)
    cleanup.push_async_callback(pool.close)
    management = Management(services.rabbitmq_api_url, vhost_of(amqp_url))
    cleanup.push_async_callback(management.aclose)
    central = Central(
        amqp_url=amqp_url,
        database_url=database_url,
        api_url=services.rabbitmq_api_url,
        api=rabbitmq_api,
        log_path=log_path,
        pool=pool,
        management=management,
        extra_env=extra_env,
    )
    cleanup.push_async_callback(central.delete_broker_users)
    return central


@pytest.fixture
async def central(
    services: Services,
    rabbitmq_api: RabbitApi,
    fresh_vhost: str,
    make_database: Any,
    tmp_path: Path,
    central_env: dict[str, str],
) -> AsyncIterator[Central]:
    database_url = await make_database()  # empty: `tillsync-central run` migrates it
    # Every step of the clean-up runs, last pushed first, even when one before it raises
    # (stop() fails a slow stop): the registers' broker users are global and must not
    # outlive the test. No error is swallowed: a later one carries the earlier as context.
    async with contextlib.AsyncExitStack() as cleanup:
        cleanup.push_async_callback(make_database.drop, database_url)
        instance = await new_central(
            cleanup,
            services,
            rabbitmq_api,
            amqp_url=fresh_vhost,
            database_url=database_url,
            log_path=tmp_path / "central.log",
            extra_env=central_env,
        )
        cleanup.push_async_callback(instance.stop)
        await instance.start()
        yield instance


def agent_env(**settings: object) -> dict[str, str]:
    """The environment of a ``tillsync-agent`` subprocess: this one without any
    ``TILLSYNC_*`` variable (the services' URLs are exported for the tests, and the
    environment overrides the agent's config file), plus ``settings`` as variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLSYNC_")}
    env.update({f"TILLSYNC_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def agent_settings(
    enrollment: Enrollment, data_dir: Path, *, amqp_url: str | None = None, **overrides: Any
) -> AgentSettings:
    """Settings for a register agent, fast timings for tests."""
    values: dict[str, Any] = {
        "register_id": enrollment.register_id,
        "center_id": enrollment.center_id,
        "amqp_url": amqp_url or enrollment.amqp_url,
        "data_dir": data_dir,
        "ack_timeout_s": 5.0,
        "publish_timeout_s": 5.0,
        "retry_base_s": 0.2,
        "retry_cap_s": 2.0,
        "reconnect_base_s": 0.2,
        "reconnect_cap_s": 2.0,
    }
    values.update(overrides)
    return load_settings(None, **values)


@contextlib.asynccontextmanager
async def running_agent(settings: AgentSettings) -> AsyncIterator[Agent]:
    """An in-process agent running until the block ends (then stopped like SIGTERM)."""
    async with Agent(settings) as agent:
        task = asyncio.create_task(agent.run())
        try:
            yield agent
        finally:
            agent.stop()
            await asyncio.wait_for(task, timeout=30)


def write_agent_config(settings: AgentSettings, path: Path) -> Path:
    lines = []
    for name, value in settings.model_dump().items():
        if value is None:  # TOML has no null: an absent key is the default
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, str | Path):
            lines.append(f'{name} = "{value}"')
        else:
            lines.append(f"{name} = {value}")
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path
