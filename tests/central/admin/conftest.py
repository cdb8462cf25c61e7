"""Admin API fixtures: the real app served by uvicorn on a free port over a fresh
database and vhost, one operator per role, and HTTP clients logged in as each."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from tillsync_central.admin import AdminServer, add_operator
from tillsync_central.settings import CentralSettings

from .admin_clients import PASSWORD, ROLES, Clients, login


@pytest.fixture
def admin_settings(settings: CentralSettings) -> CentralSettings:
    return settings.model_copy(update={"admin_port": 0, "admin_queue_sample_s": 1.0})


@pytest.fixture
async def admin(
    admin_settings: CentralSettings, pool: asyncpg.Pool, declared: None
) -> AsyncIterator[AdminServer]:
    server = AdminServer(admin_settings, pool)
    server.start()
    stopping = asyncio.Event()
    task = asyncio.create_task(server.serve(stopping))
    await asyncio.wait_for(server.serving.wait(), 10)
    yield server
    stopping.set()
    await asyncio.wait_for(task, 30)


@pytest.fixture
async def clients(admin: AdminServer, pool: asyncpg.Pool) -> AsyncIterator[Clients]:
    for role in ROLES:
        await add_operator(pool, f"op-{role}", role, PASSWORD)
    made = Clients(
        viewer=await login(admin.url, "op-viewer"),
        supervisor=await login(admin.url, "op-supervisor"),
        administrator=await login(admin.url, "op-administrator"),
        anonymous=httpx.AsyncClient(base_url=admin.url, timeout=30),
    )
    yield made
    for role in (*ROLES, "anonymous"):
        await made.of(role).aclose()
