"""Fixtures every test shares: real RabbitMQ and PostgreSQL, isolated per test or session.

Where the services come from is decided once per session by :mod:`services` (environment,
else containers, else the local ``deploy/dev/services``). Tests never use the base vhost
or database: they ask for their own.

``services``       the resolved :class:`services.Services` (admin credentials)
``rabbitmq_api``   :class:`services.RabbitApi` ``(base_url, auth)`` of the management API
``make_vhost``     ``await make_vhost()`` → AMQP URL of a new vhost (session factory)
``make_database``  ``await make_database()`` → DSN of a new empty database (session factory)
``amqp_url``       one vhost for the whole session
``database_url``   one migrated database for the whole session
``fresh_vhost``    a new vhost for one test, deleted after it
``fresh_database`` a new migrated database for one test, dropped after it

Everything created is deleted at the latest at the end of the session; a deletion that
did not happen fails the teardown.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from services import (
    DatabaseFactory,
    RabbitApi,
    Services,
    VhostFactory,
    rabbitmq_api_of,
    resolve_services,
)
from tillsync_central.db import migrate


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    with resolve_services() as found:
        yield found


@pytest.fixture(scope="session")
def rabbitmq_api(services: Services) -> RabbitApi:
    return rabbitmq_api_of(services)


@pytest.fixture(scope="session")
async def make_vhost(services: Services) -> AsyncIterator[VhostFactory]:
    factory = VhostFactory(services)
    yield factory
    await factory.close()


@pytest.fixture(scope="session")
async def make_database(services: Services) -> AsyncIterator[DatabaseFactory]:
    factory = DatabaseFactory(services)
    yield factory
    await factory.close()


@pytest.fixture(scope="session")
async def amqp_url(make_vhost: VhostFactory) -> str:
    return await make_vhost()


@pytest.fixture(scope="session")
async def database_url(make_database: DatabaseFactory) -> str:
    dsn = await make_database()
    await migrate(dsn)
    return dsn


@pytest.fixture
async def fresh_vhost(make_vhost: VhostFactory) -> AsyncIterator[str]:
    url = await make_vhost()
    yield url
    await make_vhost.drop(url)


@pytest.fixture
async def fresh_database(make_database: DatabaseFactory) -> AsyncIterator[str]:
    dsn = await make_database()
    await migrate(dsn)
    yield dsn
    await make_database.drop(dsn)
