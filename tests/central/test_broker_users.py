"""Central's least-privilege service user (issue #6), enforced by the real broker: every
central worker runs with it (documents, acks, catalog relay, delta RPC, presence), and it
cannot touch registers' queues, forge documents or heartbeats, or manage the broker."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import aio_pika
import aiormq
import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from tills import until

from agent.documents import receipt
from conftest import Enroll
from tillsync_agent import Agent, load_settings
from tillsync_agent.catalog_events import CatalogEvent
from tillsync_central.admin.queues import QueueMonitor
from tillsync_central.broker_users import (
    service_permissions,
    setup_monitoring_user,
    setup_service_user,
)
from tillsync_central.catalog import CatalogEditor, prepare_edit
from tillsync_central.management import Management
from tillsync_central.presence import fleet_presence
from tillsync_central.provisioning import ProvisioningError, register_amqp_url
from tillsync_central.runner import CentralService, declare
from tillsync_central.settings import CentralSettings
from tillsync_protocol import ConfigError, topology

DOCUMENTS = 30


def service_user_name() -> str:
    """Broker users are global: one per test, deleted afterwards."""
    return f"tillsync-central-{secrets.token_hex(4)}"


@pytest.fixture
async def service_settings(
    settings: CentralSettings, management: Management
) -> AsyncIterator[CentralSettings]:
    """``settings`` with ``amqp_url`` logging in as a fresh service user."""
    user = service_user_name()
    created = await setup_service_user(management, settings.amqp_url.get_secret_value(), user=user)
    assert created.created
    assert created.amqp_url is not None
    yield settings.model_copy(
        update={"amqp_url": SecretStr(created.amqp_url), "declare_topology": False}
    )
    await management.delete_user(user)


async def test_every_central_worker_runs_as_the_service_user(
    service_settings: CentralSettings,
    pool: asyncpg.Pool,
    enroll: Enroll,
    management: Management,
    tmp_path: Path,
) -> None:
    await declare(service_settings)  # what every `run` does first: a passive check
    service = CentralService(service_settings, pool, workers=2)
    stopping = asyncio.Event()
    running = asyncio.create_task(service.run(stopping))
    try:
        await service.wait_consuming(timeout=30)
        await asyncio.wait_for(service.relay.active.wait(), timeout=30)
        enrollment = await enroll()
        agent_settings = load_settings(
            None,
            register_id=enrollment.register_id,
            center_id=enrollment.center_id,
            amqp_url=enrollment.amqp_url,
            data_dir=tmp_path,
            api_port=0,
            heartbeat_interval_s=0.5,
        )
        events: list[CatalogEvent] = []
        async with Agent(agent_settings) as agent:
            agent.on_change(events.append)
            for n in range(DOCUMENTS):
                await agent.submit("receipt", receipt(100 + n, receipt_no=f"S-{n}"))
            agent_run = asyncio.create_task(agent.run())
            try:

                async def acked() -> bool:
                    return agent.outbox.counts.acknowledged == DOCUMENTS

                await until(acked, timeout=60)  # ingest stored them and published acks

                await CatalogEditor(pool).apply(
                    [
                        prepare_edit(
                            "global",
                            "items",
                            "svc-1",
                            state={
                                "name": "Tea",
                                "gross_price": 4900,
                                "currency": "CZK",
                                "tax_rate_id": "t",
                            },
                        )
                    ]
                )

                async def relayed() -> bool:  # relay -> the register's queue -> replica
                    return any(e.key == "svc-1" and e.source == "change" for e in events)

                await until(relayed, timeout=30)

                async def seen() -> bool:  # presence consumed its heartbeats
                    fleet = await fleet_presence(pool, 60, enrollment.center_id)
                    return bool(fleet) and fleet[0].acknowledged == DOCUMENTS

                await until(seen, timeout=30)
                assert service.rpc_stats.requests >= 1  # start-up delta answered
            finally:
                agent.stop()
                await asyncio.wait_for(agent_run, timeout=30)
    finally:
        stopping.set()
        await asyncio.wait_for(running, timeout=30)
    async with pool.acquire() as conn:
        stored = await conn.fetchval(
            "SELECT count(*) FROM documents WHERE register_id = $1", enrollment.register_id
        )
    assert stored == DOCUMENTS
    assert agent.outbox.counts.pending == 0
    assert service.ingest.stats.dead_lettered_by_broker == 0


async def test_the_service_user_cannot_touch_registers_forge_or_manage(
    service_settings: CentralSettings, enroll: Enroll, settings: CentralSettings
) -> None:
    register = await enroll()
    own_queue = topology.register_queue(register.register_id)
    url = service_settings.amqp_url.get_secret_value()
    connection = await aio_pika.connect(url, timeout=15)
    async with connection:
        # Delete, purge-by-redeclare or read a register's queue: refused.
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.queue_delete(own_queue, timeout=10)
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.declare_queue(own_queue, durable=True, timeout=10)
        channel = await connection.channel()
        queue = await channel.get_queue(own_queue, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await queue.consume(_ignore)
        # Declare anything, or delete central's own queues: refused.
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.declare_queue("sneaky", timeout=10)
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.queue_delete(topology.INGEST_QUEUE, timeout=10)
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.exchange_delete(topology.DOCS_EXCHANGE, timeout=10)
        # Publish a document as if from a register: no write on tillsync.docs.
        channel = await connection.channel(publisher_confirms=True)
        docs = await channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
        key = topology.document_key(register.center_id, register.register_id, "receipt")
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await docs.publish(aio_pika.Message(b"x"), key, timeout=10)
        # Forge a heartbeat: the topic permission on tillsync.presence refuses it.
        channel = await connection.channel(publisher_confirms=True)
        presence = await channel.get_exchange(topology.PRESENCE_EXCHANGE, ensure=False)
        heartbeat_key = topology.presence_key(register.center_id, register.register_id)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await presence.publish(aio_pika.Message(b"x"), heartbeat_key, timeout=10)
        # What it publishes, it publishes: an ack to a register is fine.
        channel = await connection.channel(publisher_confirms=True)
        registers = await channel.get_exchange(topology.REGISTERS_EXCHANGE, ensure=False)
        await registers.publish(
            aio_pika.Message(b"x"), topology.register_key(register.register_id, "ack"), timeout=10
        )
    # The admin's broker still has the register's queue, and its message.
    admin = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=15)
    async with admin:
        channel = await admin.channel()
        queue = await channel.declare_queue(own_queue, passive=True)
        assert queue.declaration_result.message_count == 1

    # No management API: cannot create users or read the broker's state.
    user, password = (
        service_settings.amqp_url.get_secret_value().split("//")[1].split("@")[0].split(":")
    )
    api = settings.rabbitmq_api_url.get_secret_value().split("@")[1]
    # A connection per request: the management API may close one after a 401.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(
        base_url=f"http://{api}", auth=(user, password), limits=fresh
    ) as client:
        created = await client.put("/api/users/intruder", json={"password": "x", "tags": ""})
        assert created.status_code == 401
        assert (await client.get("/api/overview")).status_code == 401


async def test_the_service_user_may_not_declare_and_a_missing_piece_is_a_config_error(
    service_settings: CentralSettings, settings: CentralSettings, management: Management
) -> None:
    # With declaring on, the service user is refused by the broker.
    declaring = service_settings.model_copy(update={"declare_topology": True})
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
        await declare(declaring)
    # A queue of the shared topology gone: the passive check names it.
    admin = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=15)
    async with admin:
        channel = await admin.channel()
        await channel.queue_delete(topology.PRESENCE_QUEUE)
    with pytest.raises(ConfigError) as missing:
        await declare(service_settings)
    assert missing.value.field == "declare_topology"
    assert topology.PRESENCE_QUEUE in str(missing.value)
    # Setup declares it again, and the check passes.
    user = service_settings.amqp_url.get_secret_value().split("//")[1].split(":")[0]
    await setup_service_user(management, settings.amqp_url.get_secret_value(), user=user)
    await declare(service_settings)


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    raise AssertionError("a register's message was delivered to central's service user")


async def test_setup_is_idempotent_and_keeps_the_password_unless_asked(
    settings: CentralSettings, management: Management
) -> None:
    user = service_user_name()
    url = settings.amqp_url.get_secret_value()
    try:
        first = await setup_service_user(management, url, user=user)
        again = await setup_service_user(management, url, user=user)
        assert (first.created, first.password_changed) == (True, True)
        assert (again.created, again.password_changed, again.amqp_url) == (False, False, None)
        assert first.amqp_url is not None
        assert first.amqp_url.split("@")[0].split(":")[-1] not in repr(first)
        await (await aio_pika.connect(first.amqp_url, timeout=15)).close()  # still works

        perms = (await management._client.get(f"/api/users/{user}/permissions")).json()
        expected = service_permissions()
        assert [(p["configure"], p["write"], p["read"]) for p in perms] == [
            (expected.configure, expected.write, expected.read)
        ]
        info = (await management._client.get(f"/api/users/{user}")).json()
        assert info["tags"] in ("", [])

        rotated = await setup_service_user(management, url, user=user, rotate=True)
        assert rotated.amqp_url is not None
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
            await aio_pika.connect(first.amqp_url, timeout=15)
        await (await aio_pika.connect(rotated.amqp_url, timeout=15)).close()

        for bad in ("reg-r1", "Central", ""):
            with pytest.raises(ProvisioningError):
                await setup_service_user(management, url, user=bad)
    finally:
        await management.delete_user(user)


def _cli(settings: CentralSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TILLSYNC_AMQP_URL": settings.amqp_url.get_secret_value(),
        "TILLSYNC_DATABASE_URL": settings.database_url.get_secret_value(),
        "TILLSYNC_RABBITMQ_API_URL": settings.rabbitmq_api_url.get_secret_value(),
    }
    env.pop("TILLSYNC_CONFIG", None)
    return subprocess.run(
        [str(Path(sys.executable).parent / "tillsync-central"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_cli_setup_users_writes_a_working_url_file(
    settings: CentralSettings, management: Management, tmp_path: Path
) -> None:
    user, monitor = service_user_name(), f"tillsync-monitor-{secrets.token_hex(4)}"
    url_file, api_url_file = tmp_path / "central-amqp-url", tmp_path / "monitor-api-url"
    users = ("--user", user, "--monitoring-user", monitor)
    try:
        created = await asyncio.to_thread(
            _cli, settings, "broker", "setup-users", *users,
            "--url-file", str(url_file), "--api-url-file", str(api_url_file),
        )  # fmt: skip
        assert created.returncode == 0, created.stderr
        assert url_file.stat().st_mode & 0o777 == 0o600
        assert api_url_file.stat().st_mode & 0o777 == 0o600
        service_url = url_file.read_text().strip()
        password = service_url.split("@")[0].split(":")[-1]
        assert password not in created.stdout + created.stderr
        vhost = quote(management.vhost, safe="")
        assert service_url.endswith(f"/{vhost}")
        await (await aio_pika.connect(service_url, timeout=15)).close()
        monitor_url = api_url_file.read_text().strip()
        assert monitor_url.startswith(f"http://{monitor}:")
        assert monitor_url.split("@")[0].split(":")[-1] not in created.stdout + created.stderr
        await _assert_monitoring_only(monitor_url, management.vhost, service_url)

        again = await asyncio.to_thread(_cli, settings, "broker", "setup-users", *users)
        assert again.returncode == 0, again.stderr
        assert again.stdout.count("password kept") == 2
        await (await aio_pika.connect(service_url, timeout=15)).close()
        await _assert_monitoring_only(monitor_url, management.vhost, service_url)

        bad = await asyncio.to_thread(_cli, settings, "broker", "setup-users", "--user", "reg-x")
        assert bad.returncode == 1
        assert "field=user" in bad.stderr
    finally:
        await management.delete_user(user)
        await management.delete_user(monitor)


async def test_the_monitoring_user_reads_queues_and_changes_nothing(
    settings: CentralSettings, management: Management
) -> None:
    user = f"tillsync-monitor-{secrets.token_hex(4)}"
    api_url = settings.rabbitmq_api_url.get_secret_value()
    amqp_url = settings.amqp_url.get_secret_value()
    await management.declare_shared_topology()  # what it will see
    try:
        first = await setup_monitoring_user(management, api_url, user=user)
        assert (first.created, first.password_changed) == (True, True)
        assert first.amqp_url is not None
        info = (await management._client.get(f"/api/users/{user}")).json()
        assert info["tags"] in ("monitoring", ["monitoring"])
        await _assert_monitoring_only(first.amqp_url, management.vhost, amqp_url)
        # Its queue list is what the dashboard's Queues page shows.
        monitored = settings.model_copy(update={"rabbitmq_api_url": SecretStr(first.amqp_url)})
        names = [q.name for q in await QueueMonitor(monitored).sample()]
        assert topology.INGEST_QUEUE in names
        again = await setup_monitoring_user(management, api_url, user=user)
        assert (again.created, again.password_changed, again.amqp_url) == (False, False, None)
        await _assert_monitoring_only(first.amqp_url, management.vhost, amqp_url)
    finally:
        await management.delete_user(user)


async def _assert_monitoring_only(api_url: str, vhost: str, amqp_url: str) -> None:
    """It reads the vhost's queues over the management API; it can change nothing there,
    and over AMQP it may not publish nor consume."""
    parts = urlsplit(api_url)
    auth = (unquote(parts.username or ""), unquote(parts.password or ""))
    base = f"{parts.scheme}://{parts.hostname}:{parts.port}"
    # No keep-alive: the management API may close a connection after refusing a request.
    fresh = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, auth=auth, timeout=15, limits=fresh) as client:

        async def listed() -> bool:
            # A queue just declared shows once the broker's next statistics are in.
            queues = await client.get(f"/api/queues/{quote(vhost, safe='')}")
            assert queues.status_code == 200
            return topology.INGEST_QUEUE in [q["name"] for q in queues.json()]

        await until(listed, timeout=20, interval=0.5)
        user = await client.put("/api/users/intruder", json={"password": "x", "tags": ""})
        assert user.status_code in (401, 403)
        gone = await client.delete(
            f"/api/queues/{quote(vhost, safe='')}/{quote(topology.INGEST_QUEUE, safe='')}"
        )
        assert gone.status_code in (401, 403)
    # The same user over AMQP, on central's vhost.
    connection = await aio_pika.connect(register_amqp_url(amqp_url, *auth), timeout=15)
    try:
        exchange = await (await connection.channel()).get_exchange(
            topology.DOCS_EXCHANGE, ensure=False
        )
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await exchange.publish(aio_pika.Message(b"x"), "c.r.receipt", timeout=15)
        queue = await (await connection.channel()).get_queue(topology.INGEST_QUEUE, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await queue.consume(_ignore)
    finally:
        await connection.close()
