"""Presence with the real broker and database: a real agent's heartbeats reach
``register_presence`` with its exact counts; a register that stops goes offline after
three intervals; forged or broken heartbeats become dead letters and change nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import asyncpg
import pytest
from tills import until

from agent.documents import receipt
from conftest import Enroll
from tillsync_agent import Agent, AgentSettings, __version__, load_settings
from tillsync_central.presence import PresenceWorker, fleet_presence
from tillsync_central.provisioning import Enrollment
from tillsync_central.runner import IngestService
from tillsync_central.settings import CentralSettings
from tillsync_protocol import CONTENT_TYPE, Heartbeat, HeartbeatBody, encode, topology

INTERVAL = 0.3


@pytest.fixture
async def presence(
    settings: CentralSettings, pool: asyncpg.Pool, declared: None
) -> AsyncIterator[PresenceWorker]:
    worker = PresenceWorker(settings, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping))
    await asyncio.wait_for(worker.connected.wait(), timeout=30)
    yield worker
    stopping.set()
    await asyncio.wait_for(task, timeout=30)


def agent_settings(enrollment: Enrollment, data_dir: Path, **overrides: Any) -> AgentSettings:
    values: dict[str, Any] = {
        "register_id": enrollment.register_id,
        "center_id": enrollment.center_id,
        "amqp_url": enrollment.amqp_url,
        "data_dir": data_dir,
        "heartbeat_interval_s": INTERVAL,
        "ack_timeout_s": 3600.0,
        "reconnect_base_s": 0.2,
        "reconnect_cap_s": 1.0,
    }
    values.update(overrides)
    return load_settings(None, **values)


async def presence_row(pool: asyncpg.Pool, register_id: str) -> asyncpg.Record | None:
    return await pool.fetchrow(
        "SELECT * FROM register_presence WHERE register_id = $1", register_id
    )


async def test_heartbeats_carry_the_exact_pending_count_both_ways(
    enroll: Enroll,
    presence: PresenceWorker,
    settings: CentralSettings,
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    enrollment = await enroll()
    async with Agent(agent_settings(enrollment, tmp_path)) as agent:
        for n in range(7):
            await agent.submit("receipt", receipt(100 + n, receipt_no=f"R-{n}"))
        run = asyncio.create_task(agent.run())
        try:
            # No ingest worker runs: the documents are confirmed by the broker and wait in
            # tillsync.ingest, so the register's pending count stays 7.
            async def shows_seven() -> bool:
                row = await presence_row(pool, enrollment.register_id)
                return row is not None and row["pending"] == 7

            await until(shows_seven, timeout=30)
            counts = agent.outbox.counts
            row = await presence_row(pool, enrollment.register_id)
            assert row is not None
            assert (
                (row["pending"], row["last_seq"], row["acknowledged"], row["rejected"])
                == (
                    counts.pending,
                    counts.last_seq,
                    counts.acknowledged,
                    counts.rejected,
                )
                == (7, 7, 0, 0)
            )
            assert row["agent_version"] == __version__
            assert row["heartbeat"]["type"] == "heartbeat"
            assert row["heartbeat"]["body"]["register_id"] == enrollment.register_id
            assert row["cursors"] == await agent.replica.cursors()

            # Central comes up: everything is acknowledged, and the next heartbeat says so.
            ingest = IngestService(settings, pool)
            stopping = asyncio.Event()
            ingest_task = asyncio.create_task(ingest.run(stopping))
            try:

                async def shows_zero() -> bool:
                    row = await presence_row(pool, enrollment.register_id)
                    return row is not None and row["pending"] == 0 and row["acknowledged"] == 7

                await until(shows_zero, timeout=30)
                assert agent.outbox.counts.pending == 0
            finally:
                stopping.set()
                await asyncio.wait_for(ingest_task, timeout=30)
            assert agent.heartbeats.stats.sent >= 2
            assert agent.heartbeats.stats.failed == 0
        finally:
            agent.stop()
            await asyncio.wait_for(run, timeout=30)


async def test_a_register_that_stops_is_offline_after_three_intervals(
    enroll: Enroll,
    presence: PresenceWorker,
    settings: CentralSettings,
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    enrollment = await enroll()
    register = enrollment.register_id
    offline_after = 3 * INTERVAL
    [before] = await fleet_presence(pool, offline_after, enrollment.center_id)
    assert before.state == "never seen"

    async def state() -> str:
        [info] = await fleet_presence(pool, offline_after, enrollment.center_id)
        return info.state

    async with Agent(agent_settings(enrollment, tmp_path)) as agent:
        run = asyncio.create_task(agent.run())
        try:

            async def online() -> bool:
                return await state() == "online"

            await until(online, timeout=30)
            # Online is not a single beat: it stays online over several intervals.
            for _ in range(4):
                await asyncio.sleep(INTERVAL)
                assert await state() == "online"
        finally:
            agent.stop()
            await asyncio.wait_for(run, timeout=30)
    stopped = asyncio.get_running_loop().time()
    # A beat confirmed just before the stop may still be on its way to the presence worker
    # (milliseconds; beats are jittered, so one can come right before the stop).
    await asyncio.sleep(INTERVAL)
    last = await presence_row(pool, register)
    assert last is not None

    async def offline() -> bool:
        return await state() == "offline"

    await until(offline, timeout=10, interval=0.05)
    waited = asyncio.get_running_loop().time() - stopped
    # The last heartbeat came at most one interval (plus the transfer) before the stop.
    assert waited >= offline_after - INTERVAL - 0.2, waited
    row = await presence_row(pool, register)
    assert row is not None
    assert row["last_seen"] == last["last_seen"]

    # `registers list` says the same, with the setting taken from the environment.
    env = {
        **os.environ,
        "TILLSYNC_AMQP_URL": settings.amqp_url.get_secret_value(),
        "TILLSYNC_DATABASE_URL": settings.database_url.get_secret_value(),
        "TILLSYNC_RABBITMQ_API_URL": settings.rabbitmq_api_url.get_secret_value(),
        "TILLSYNC_HEARTBEAT_INTERVAL_S": str(INTERVAL),
    }
    listed = await asyncio.to_thread(
        subprocess.run,
        [str(Path(sys.executable).parent / "tillsync-central"), "registers", "list", "--json"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr.decode()
    rows = [json.loads(line) for line in listed.stdout.decode().splitlines() if line.strip()]
    [mine] = [r for r in rows if r["register_id"] == register]
    assert mine["presence"] == "offline"
    assert mine["pending"] == 0
    assert mine["agent_version"] == __version__


def heartbeat_bytes(center_id: str, register_id: str, pending: int = 1) -> bytes:
    return encode(
        Heartbeat(
            msg_id=str(uuid.uuid4()),
            created_at=1_767_258_000_000,
            body=HeartbeatBody(
                register_id=register_id,
                center_id=center_id,
                agent_version="9.9.9",
                pending=pending,
                rejected=0,
                acknowledged=0,
                last_seq=pending,
            ),
        )
    )


async def publish(amqp_url: str, key: str, body: bytes, *, user_id: str | None) -> None:
    connection = await aio_pika.connect(amqp_url, timeout=15)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.PRESENCE_EXCHANGE, ensure=False)
        await exchange.publish(
            aio_pika.Message(body, content_type=CONTENT_TYPE, user_id=user_id, type="heartbeat"),
            key,
            timeout=10,
        )


async def test_forged_and_broken_heartbeats_are_dead_lettered(
    enroll: Enroll,
    presence: PresenceWorker,
    settings: CentralSettings,
    pool: asyncpg.Pool,
) -> None:
    victim = await enroll()
    forger = await enroll()
    admin_url = settings.amqp_url.get_secret_value()
    admin_user = unquote(urlsplit(admin_url).username or "")
    victim_key = topology.presence_key(victim.center_id, victim.register_id)
    forger_key = topology.presence_key(forger.center_id, forger.register_id)
    victim_hb = heartbeat_bytes(victim.center_id, victim.register_id)

    # Central's own (administrator) user, in its own name and with no name at all.
    await publish(admin_url, victim_key, victim_hb, user_id=admin_user)
    await publish(
        admin_url,
        victim_key,
        heartbeat_bytes(victim.center_id, victim.register_id, 2),
        user_id=None,
    )
    # A register, in its own name and under its own key, claiming to be another one.
    await publish(forger.amqp_url, forger_key, victim_hb, user_id=forger.broker_user)
    # A register under its own key, whose body names another center.
    await publish(
        forger.amqp_url,
        forger_key,
        heartbeat_bytes(victim.center_id, forger.register_id, 3),
        user_id=forger.broker_user,
    )
    # Not MessagePack.
    await publish(forger.amqp_url, forger_key, b"\xc1not msgpack", user_id=forger.broker_user)
    # A register revoked in the database while its broker user still works.
    await pool.execute(
        "UPDATE registers SET revoked_at = now() WHERE register_id = $1", forger.register_id
    )
    await publish(
        forger.amqp_url,
        forger_key,
        heartbeat_bytes(forger.center_id, forger.register_id, 4),
        user_id=forger.broker_user,
    )

    async def all_kept() -> bool:
        n = await pool.fetchval("SELECT count(*) FROM dead_letters WHERE source = 'presence'")
        return int(n) >= 6

    await until(all_kept, timeout=30)
    rows = await pool.fetch(
        "SELECT code, field, user_id, routing_key, register_id FROM dead_letters "
        "WHERE source = 'presence' ORDER BY id"
    )
    codes = [(r["code"], r["field"], r["user_id"]) for r in rows]
    assert codes == [
        ("identity_mismatch", "register_id", admin_user),
        ("missing_user_id", "user_id", None),
        ("identity_mismatch", "register_id", forger.broker_user),
        ("identity_mismatch", "center_id", forger.broker_user),
        ("malformed", "", forger.broker_user),
        ("unknown_register", "register_id", forger.broker_user),
    ]
    assert await pool.fetchval("SELECT count(*) FROM register_presence") == 0
    assert presence.stats.refused == 6
    assert presence.stats.stored == 0
