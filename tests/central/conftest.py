"""Central's fixtures: settings on a fresh vhost and database, a pool, the declared
topology, register enrollment (broker users deleted afterwards) and an in-process ingest
service that is stopped cleanly at the end of the test."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from services import Services
from tillsync_central.db import create_pool
from tillsync_central.management import Management
from tillsync_central.provisioning import Enrollment, add_register
from tillsync_central.runner import IngestService, declare
from tillsync_central.settings import CentralSettings

Enroll = Callable[..., Awaitable[Enrollment]]


def new_id(prefix: str) -> str:
    """A register or center id no other test uses (broker users are global)."""
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
def settings(services: Services, fresh_vhost: str, fresh_database: str) -> CentralSettings:
    return CentralSettings(
        config=None,
        amqp_url=fresh_vhost,
        database_url=fresh_database,
        rabbitmq_api_url=services.rabbitmq_api_url,
        ingest_batch_size=200,
        ingest_batch_max_wait_ms=20,
        ingest_prefetch=500,
    )


@pytest.fixture
async def pool(settings: CentralSettings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(settings)
    yield pool
    await pool.close()


@pytest.fixture
async def declared(settings: CentralSettings) -> None:
    await declare(settings)


@pytest.fixture
async def management(settings: CentralSettings) -> AsyncIterator[Management]:
    async with Management.from_settings(settings) as management:
        yield management


@pytest.fixture
async def enroll(
    settings: CentralSettings, pool: asyncpg.Pool, declared: None, management: Management
) -> AsyncIterator[Enroll]:
    users: list[str] = []

    async def _enroll(center_id: str | None = None, register_id: str | None = None) -> Enrollment:
        enrollment = await add_register(
            pool,
            management,
            settings.amqp_url.get_secret_value(),
            center_id or new_id("c"),
            register_id or new_id("r"),
        )
        users.append(enrollment.broker_user)
        return enrollment

    yield _enroll
    for user in users:
        await management.delete_user(user)


@pytest.fixture
async def ingest(
    settings: CentralSettings, pool: asyncpg.Pool, declared: None
) -> AsyncIterator[IngestService]:
    service = IngestService(settings, pool, workers=2)
    stopping = asyncio.Event()
    task = asyncio.create_task(service.run(stopping))
    await service.wait_consuming(timeout=30)
    yield service
    stopping.set()
    await asyncio.wait_for(task, timeout=30)
