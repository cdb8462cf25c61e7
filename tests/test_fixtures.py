"""The shared fixtures really isolate tests and really clean up."""

from __future__ import annotations

from importlib import resources

import aio_pika
import asyncpg
import httpx
import pytest

from services import (
    LOCAL_SERVICES,
    DatabaseFactory,
    RabbitApi,
    Services,
    VhostFactory,
    resolve_services,
    vhost_of,
    with_database,
    with_vhost,
)


async def _vhost_exists(api: RabbitApi, name: str) -> bool:
    async with httpx.AsyncClient(base_url=api.base_url, auth=api.auth, timeout=10) as client:
        response = await client.get(f"/api/vhosts/{name}")
    return response.status_code == 200


async def _queue_names(api: RabbitApi, vhost: str) -> set[str]:
    async with httpx.AsyncClient(base_url=api.base_url, auth=api.auth, timeout=10) as client:
        response = await client.get(f"/api/queues/{vhost}")
    response.raise_for_status()
    return {queue["name"] for queue in response.json()}


async def _database_exists(services: Services, name: str) -> bool:
    conn = await asyncpg.connect(services.database_url, timeout=10)
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("url", "vhost"),
    [
        ("amqp://u:p@h:5672/", "/"),
        ("amqp://u:p@h:5672", "/"),
        ("amqp://u:p@h:5672/tillsync_test_0123abcd", "tillsync_test_0123abcd"),
        ("amqp://u:p@h/%2Fodd%20name", "/odd name"),
    ],
)
def test_vhost_of(url: str, vhost: str) -> None:
    assert vhost_of(url) == vhost
    assert vhost_of(with_vhost("amqp://u:p@h:5672/", vhost)) == vhost


def test_with_database_keeps_credentials_and_query() -> None:
    dsn = with_database("postgresql://u:p@h:5432/base?sslmode=disable", "tillsync_test_00000000")
    assert dsn == "postgresql://u:p@h:5432/tillsync_test_00000000?sslmode=disable"


def test_environment_wins_and_fills_the_rest_with_defaults() -> None:
    environ = {"TILLSYNC_DATABASE_URL": "postgresql://x:y@db:5432/z"}
    with resolve_services(environ) as found:
        assert found.database_url == "postgresql://x:y@db:5432/z"
        assert found.amqp_url == LOCAL_SERVICES.amqp_url
        assert found.rabbitmqctl is None


async def test_vhosts_are_isolated_and_deleted(
    make_vhost: VhostFactory, rabbitmq_api: RabbitApi
) -> None:
    first, second = await make_vhost(), await make_vhost()
    assert vhost_of(first) != vhost_of(second)
    assert vhost_of(first).startswith("tillsync_test_")

    connection = await aio_pika.connect(first, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue("only-in-first", durable=True)

    assert "only-in-first" in await _queue_names(rabbitmq_api, vhost_of(first))
    assert "only-in-first" not in await _queue_names(rabbitmq_api, vhost_of(second))

    for url in (first, second):
        await make_vhost.drop(url)
        assert not await _vhost_exists(rabbitmq_api, vhost_of(url))


async def test_fresh_vhost_is_empty_and_usable(fresh_vhost: str, rabbitmq_api: RabbitApi) -> None:
    assert await _vhost_exists(rabbitmq_api, vhost_of(fresh_vhost))
    assert await _queue_names(rabbitmq_api, vhost_of(fresh_vhost)) == set()
    connection = await aio_pika.connect(fresh_vhost, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(aio_pika.Message(b"ping"), routing_key=queue.name)
        message = await queue.get(timeout=10)
        assert message.body == b"ping"
        await message.ack()


async def test_session_vhost_differs_from_fresh_ones(amqp_url: str, fresh_vhost: str) -> None:
    assert vhost_of(amqp_url).startswith("tillsync_test_")
    assert vhost_of(amqp_url) != vhost_of(fresh_vhost)


async def test_databases_are_isolated_and_dropped(
    make_database: DatabaseFactory, services: Services
) -> None:
    first, second = await make_database(), await make_database()
    first_name = first.rsplit("/", 1)[1]
    assert await _database_exists(services, first_name)

    conn = await asyncpg.connect(first, timeout=10)
    try:
        assert (
            await conn.fetchval("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == 0
        )
        await conn.execute("CREATE TABLE only_in_first (id int)")
    finally:
        await conn.close()
    conn = await asyncpg.connect(second, timeout=10)
    try:
        assert await conn.fetchval("SELECT to_regclass('only_in_first')") is None
        # A connection still open does not stop the drop: it is forced.
        await make_database.drop(second)
    finally:
        await conn.close()

    await make_database.drop(first)
    assert not await _database_exists(services, first_name)


MIGRATIONS = sorted(
    path.name.removesuffix(".sql")
    for path in resources.files("tillsync_central.db.migrations").iterdir()
    if path.name.endswith(".sql")
)


async def test_fresh_database_is_migrated(fresh_database: str, database_url: str) -> None:
    assert fresh_database != database_url
    for dsn in (fresh_database, database_url):
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            names = [row["name"] for row in await conn.fetch("SELECT name FROM schema_migrations")]
        finally:
            await conn.close()
        assert names == MIGRATIONS
