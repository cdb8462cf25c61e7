"""Enrolling and revoking registers: rows, queue, and a broker user the broker confines."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from urllib.parse import quote

import aio_pika
import aiormq
import asyncpg
import pytest
from tills import Till, canonical, until

from conftest import Enroll, new_id
from tillsync_central.management import Management
from tillsync_central.provisioning import list_registers, permissions_for, revoke_register
from tillsync_central.settings import CentralSettings
from tillsync_protocol import topology


async def test_add_creates_rows_queue_bindings_and_a_least_rights_user(
    enroll: Enroll, pool: asyncpg.Pool, management: Management
) -> None:
    center, register = new_id("c"), new_id("r")
    enrollment = await enroll(center, register)
    assert enrollment.broker_user == f"reg-{register}"
    assert enrollment.broker_user in enrollment.amqp_url
    assert enrollment.password not in repr(enrollment)

    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM registers WHERE register_id = $1", register)
        assert row["center_id"] == center
        assert row["broker_user"] == enrollment.broker_user
        assert row["revoked_at"] is None
        assert await conn.fetchval("SELECT 1 FROM centers WHERE center_id = $1", center)
        assert (
            await conn.fetchval(
                "SELECT contiguous_seq FROM register_state WHERE register_id = $1", register
            )
            == 0
        )

    client = management._client
    vhost = quote(management.vhost, safe="")
    queue_path = f"/api/queues/{vhost}/{topology.register_queue(register)}"
    queue = (await client.get(queue_path)).json()
    assert queue["arguments"] == topology.register_queue_arguments()
    user = (await client.get(f"/api/users/{enrollment.broker_user}")).json()
    assert user["tags"] in ("", [])
    perms = (await client.get(f"/api/users/{enrollment.broker_user}/permissions")).json()
    assert len(perms) == 1
    expected = permissions_for(center, register)
    assert perms[0]["configure"] == "^$"
    assert perms[0]["write"] == expected.write
    assert perms[0]["read"] == expected.read
    topic = (await client.get(f"/api/users/{enrollment.broker_user}/topic-permissions")).json()
    assert {t["exchange"]: t["write"] for t in topic} == expected.topic_write


async def test_a_register_publishes_only_its_own_keys_and_reads_only_its_queue(
    enroll: Enroll,
) -> None:
    mine = await enroll()
    other = await enroll()
    async with Till(mine) as till:
        raw = till.document(1)
        await till.publish(canonical(raw), message_id=raw["doc_id"])  # its own key: fine

    connection = await aio_pika.connect(mine.amqp_url)
    async with connection:
        # Another register's routing key: the broker closes the channel.
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
        other_key = topology.document_key(other.center_id, other.register_id, "receipt")
        message = aio_pika.Message(b"x", user_id=mine.broker_user)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await exchange.publish(message, other_key, timeout=10)
        # A routing key of its own register in another center: refused as well.
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await exchange.publish(
                message,
                topology.document_key(other.center_id, mine.register_id, "receipt"),
                timeout=10,
            )
        # Another register's user_id: RabbitMQ itself refuses (PRECONDITION_FAILED).
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await exchange.publish(
                aio_pika.Message(b"x", user_id=other.broker_user),
                topology.document_key(mine.center_id, mine.register_id, "receipt"),
                timeout=10,
            )
        # Another register's queue: cannot consume it.
        channel = await connection.channel()
        queue = await channel.get_queue(topology.register_queue(other.register_id), ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await queue.consume(_ignore)
        # Nor declare anything.
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await channel.declare_queue("sneaky", timeout=10)


async def _ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
    raise AssertionError("another register's message was delivered")


async def test_revoke_deletes_the_user_closes_its_connections_and_marks_the_row(
    enroll: Enroll, pool: asyncpg.Pool, management: Management
) -> None:
    enrollment = await enroll()
    connection = await aio_pika.connect(enrollment.amqp_url)
    closed = asyncio.Event()
    connection.close_callbacks.add(lambda *_: closed.set())

    async def listed() -> bool:  # the management API lists a new connection shortly after
        return bool(await management.connections_of(enrollment.broker_user))

    await until(listed)

    revocation = await revoke_register(pool, management, enrollment.register_id)

    # RabbitMQ closes a deleted user's connections itself; revoke closes any it still lists.
    assert revocation.user_deleted
    assert revocation.connections_closed in (0, 1)
    await asyncio.wait_for(closed.wait(), timeout=15)
    assert not await management.user_exists(enrollment.broker_user)
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(enrollment.amqp_url)
    [info] = [r for r in await list_registers(pool) if r.register_id == enrollment.register_id]
    assert info.revoked_at is not None
    again = await revoke_register(pool, management, enrollment.register_id)
    assert not again.user_deleted
    assert again.connections_closed == 0


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


async def test_cli_add_with_bundle_list_and_revoke(
    settings: CentralSettings, management: Management, tmp_path: Path
) -> None:
    center, register = new_id("c"), new_id("r")
    bundle = tmp_path / "agent.toml"
    try:
        added = await asyncio.to_thread(
            _cli,
            settings,
            "registers",
            "add",
            "--center",
            center,
            "--register",
            register,
            "--bundle",
            str(bundle),
        )
        assert added.returncode == 0, added.stderr
        assert bundle.stat().st_mode & 0o777 == 0o600
        config = tomllib.loads(bundle.read_text())
        assert config["register_id"] == register
        assert config["center_id"] == center
        password = config["amqp_url"].split(":")[2].split("@")[0]
        assert password not in added.stdout + added.stderr
        connection = await aio_pika.connect(config["amqp_url"])  # the bundle works
        await connection.close()

        listed = await asyncio.to_thread(_cli, settings, "registers", "list")
        assert listed.returncode == 0, listed.stderr
        assert register in listed.stdout
        assert "active" in listed.stdout

        revoked = await asyncio.to_thread(_cli, settings, "registers", "revoke", register)
        assert revoked.returncode == 0, revoked.stderr
        assert not await management.user_exists(f"reg-{register}")

        unknown = await asyncio.to_thread(_cli, settings, "registers", "revoke", new_id("r"))
        assert unknown.returncode == 1
        assert "unknown_register" in unknown.stderr

        bad = await asyncio.to_thread(
            _cli, settings, "registers", "add", "--center", "Bad.Center", "--register", "r1"
        )
        assert bad.returncode == 1
        assert "field=center_id" in bad.stderr
    finally:
        await management.delete_user(f"reg-{register}")
