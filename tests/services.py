"""The real RabbitMQ and PostgreSQL the tests run against, and disposable pieces of them.

Where the services come from, first match wins:

1. ``TILLSYNC_AMQP_URL`` / ``TILLSYNC_DATABASE_URL`` / ``TILLSYNC_RABBITMQ_API_URL`` /
   ``TILLSYNC_RABBITMQCTL`` (any of the URLs set; the others fall back to the defaults);
2. containers (RabbitMQ with the management plugin, PostgreSQL) when a Docker engine
   answers;
3. the local services ``deploy/dev/services start`` creates.

Tests never share state through these: each gets its own vhost (:class:`VhostFactory`)
and database (:class:`DatabaseFactory`), named ``tillsync_test_<8 hex>`` and deleted at
the end, with a check that the deletion really happened.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg
import httpx

__all__ = [
    "LOCAL_SERVICES",
    "DatabaseFactory",
    "RabbitApi",
    "Services",
    "VhostFactory",
    "new_name",
    "rabbitmq_api_of",
    "resolve_services",
    "vhost_of",
    "with_database",
    "with_vhost",
]

RABBITMQ_IMAGE = "rabbitmq:3.10-management"
POSTGRES_IMAGE = "postgres:15"
_NAME = re.compile(r"^tillsync_test_[0-9a-f]{8}$")
_TIMEOUT = 30.0


@dataclass(frozen=True)
class Services:
    """Where the broker and the database are, with an administrator's credentials."""

    amqp_url: str
    database_url: str
    rabbitmq_api_url: str
    rabbitmqctl: str | None
    """A ``rabbitmqctl`` for the broker (fault tests stop and start the app), if local."""


LOCAL_SERVICES = Services(
    amqp_url="amqp://tillsync:tillsync@127.0.0.1:5672/",
    database_url="postgresql://tillsync:tillsync@127.0.0.1:5432/tillsync",
    rabbitmq_api_url="http://tillsync:tillsync@127.0.0.1:15672/",
    rabbitmqctl="/var/tmp/tillsync-dev/bin/rabbitmqctl",
)


class RabbitApi(NamedTuple):
    """The management HTTP API: ``httpx.AsyncClient(base_url=..., auth=...)``."""

    base_url: str
    auth: tuple[str, str]


def new_name() -> str:
    return f"tillsync_test_{secrets.token_hex(4)}"


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names (``/`` when it names none)."""
    path = urlsplit(url).path
    return "/" if path in ("", "/") else unquote(path[1:])


def with_vhost(url: str, vhost: str) -> str:
    """The AMQP URL with its vhost replaced."""
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(vhost, safe="")))


def with_database(dsn: str, database: str) -> str:
    """The PostgreSQL DSN with its database replaced."""
    return urlunsplit(urlsplit(dsn)._replace(path="/" + quote(database, safe="")))


def rabbitmq_api_of(services: Services) -> RabbitApi:
    parts = urlsplit(services.rabbitmq_api_url)
    netloc = parts.hostname or "127.0.0.1"
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    auth = (unquote(parts.username or "guest"), unquote(parts.password or "guest"))
    return RabbitApi(urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")), auth)


@contextmanager
def resolve_services(environ: Mapping[str, str] | None = None) -> Iterator[Services]:
    """The services to test against; containers started here are stopped on exit."""
    env = os.environ if environ is None else environ
    keys = ("TILLSYNC_AMQP_URL", "TILLSYNC_DATABASE_URL", "TILLSYNC_RABBITMQ_API_URL")
    if any(env.get(key) for key in keys):
        yield replace(
            LOCAL_SERVICES,
            amqp_url=env.get("TILLSYNC_AMQP_URL") or LOCAL_SERVICES.amqp_url,
            database_url=env.get("TILLSYNC_DATABASE_URL") or LOCAL_SERVICES.database_url,
            rabbitmq_api_url=env.get("TILLSYNC_RABBITMQ_API_URL")
            or LOCAL_SERVICES.rabbitmq_api_url,
            rabbitmqctl=env.get("TILLSYNC_RABBITMQCTL") or None,
        )
    elif _docker_answers():
        with _containers() as services:
            yield services
    else:
        rabbitmqctl = env.get("TILLSYNC_RABBITMQCTL") or LOCAL_SERVICES.rabbitmqctl
        yield replace(LOCAL_SERVICES, rabbitmqctl=rabbitmqctl)


def _docker_answers() -> bool:
    try:
        import docker  # type: ignore[import-untyped]  # the testcontainers dependency

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no client library, no socket, no daemon: all mean "no Docker"
        return False


@contextmanager
def _containers() -> Iterator[Services]:
    from testcontainers.core.container import DockerContainer
    from testcontainers.postgres import PostgresContainer

    with ExitStack() as stack:
        postgres = PostgresContainer(
            POSTGRES_IMAGE, username="tillsync", password="tillsync", dbname="tillsync"
        )
        stack.enter_context(postgres)
        rabbit = (
            DockerContainer(RABBITMQ_IMAGE)
            .with_env("RABBITMQ_DEFAULT_USER", "tillsync")
            .with_env("RABBITMQ_DEFAULT_PASS", "tillsync")
            .with_exposed_ports(5672, 15672)
        )
        stack.enter_context(rabbit)
        pg_host = postgres.get_container_host_ip()
        mq_host = rabbit.get_container_host_ip()
        services = Services(
            amqp_url=f"amqp://tillsync:tillsync@{mq_host}:{rabbit.get_exposed_port(5672)}/",
            database_url=(
                f"postgresql://tillsync:tillsync@{pg_host}:"
                f"{postgres.get_exposed_port(5432)}/tillsync"
            ),
            rabbitmq_api_url=f"http://tillsync:tillsync@{mq_host}:{rabbit.get_exposed_port(15672)}/",
            rabbitmqctl=None,
        )
        _wait_for_rabbitmq(services, deadline=time.monotonic() + 120)
        yield services


def _wait_for_rabbitmq(services: Services, deadline: float) -> None:
    """Until the management API answers and the AMQP listener is up."""
    api = rabbitmq_api_of(services)
    port = urlsplit(services.amqp_url).port or 5672
    with httpx.Client(base_url=api.base_url, auth=api.auth, timeout=5) as client:
        while True:
            try:
                check = client.get(f"/api/health/checks/port-listener/{port}")
                if check.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ at {api.base_url} did not start in time")
            time.sleep(1)


def _checked_name(name: str) -> str:
    # Identifiers cannot be bound as parameters: only our own generated names are used.
    if not _NAME.match(name):
        raise ValueError(f"not a test resource name: {name!r}")
    return name


class VhostFactory:
    """``await make_vhost()`` → the AMQP URL of a new, empty vhost the admin user owns."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._api = rabbitmq_api_of(services)
        self._created: set[str] = set()

    def _client(self) -> httpx.AsyncClient:
        # One client per call: no connection outlives the event loop that opened it.
        return httpx.AsyncClient(base_url=self._api.base_url, auth=self._api.auth, timeout=_TIMEOUT)

    async def __call__(self) -> str:
        name = new_name()
        path = quote(name, safe="")
        users = {self._api.auth[0], unquote(urlsplit(self._services.amqp_url).username or "guest")}
        async with self._client() as client:
            (await client.put(f"/api/vhosts/{path}")).raise_for_status()
            self._created.add(name)
            for user in sorted(users):
                response = await client.put(
                    f"/api/permissions/{path}/{quote(user, safe='')}",
                    json={"configure": ".*", "write": ".*", "read": ".*"},
                )
                response.raise_for_status()
        return with_vhost(self._services.amqp_url, name)

    async def drop(self, url: str) -> None:
        """Delete the vhost of ``url`` (one this factory made), and check it is gone."""
        name = _checked_name(vhost_of(url))
        path = quote(name, safe="")
        async with self._client() as client:
            response = await client.delete(f"/api/vhosts/{path}")
            if response.status_code not in (204, 404):
                response.raise_for_status()
            if (await client.get(f"/api/vhosts/{path}")).status_code != 404:
                raise RuntimeError(f"vhost {name} still exists after DELETE")
        self._created.discard(name)

    async def close(self) -> None:
        """Delete every vhost still left; raise if any survives."""
        failures = []
        for name in sorted(self._created):
            try:
                await self.drop(with_vhost(self._services.amqp_url, name))
            except Exception as exc:  # keep dropping the others, then report all
                failures.append(f"{name}: {exc!r}")
        if failures:
            raise RuntimeError("test vhosts not deleted: " + "; ".join(failures))


_DROP_TRIES = 10


class DatabaseFactory:
    """``await make_database()`` → the DSN of a new, empty database the test role owns."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self._created: set[str] = set()

    async def _admin(self) -> asyncpg.Connection:
        return await asyncpg.connect(self._services.database_url, timeout=_TIMEOUT)

    async def __call__(self) -> str:
        name = new_name()
        conn = await self._admin()
        try:
            await conn.execute(f'CREATE DATABASE "{_checked_name(name)}"')
        finally:
            await conn.close()
        self._created.add(name)
        return with_database(self._services.database_url, name)

    async def drop(self, dsn: str) -> None:
        """Drop the database of ``dsn`` (one this factory made, even if in use), and check."""
        name = _checked_name(unquote(urlsplit(dsn).path.lstrip("/")))
        conn = await self._admin()
        try:
            for attempt in range(_DROP_TRIES):
                try:
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                    break
                except asyncpg.InsufficientPrivilegeError:
                    # An autovacuum worker (a superuser's backend, which FORCE may not
                    # terminate for us) is in the database: it is done within moments.
                    if attempt == _DROP_TRIES - 1:
                        raise
                    await asyncio.sleep(0.2 * (attempt + 1))
            if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name):
                raise RuntimeError(f"database {name} still exists after DROP")
        finally:
            await conn.close()
        self._created.discard(name)

    async def close(self) -> None:
        """Drop every database still left; raise if any survives."""
        failures = []
        for name in sorted(self._created):
            try:
                await self.drop(with_database(self._services.database_url, name))
            except Exception as exc:  # keep dropping the others, then report all
                failures.append(f"{name}: {exc!r}")
        if failures:
            raise RuntimeError("test databases not deleted: " + "; ".join(failures))
