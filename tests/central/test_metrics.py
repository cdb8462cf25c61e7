"""``/metrics`` in-process, against the real broker and database: the fleet gauges follow a
real agent's heartbeats (online, offline, pending), a scrape still answers while
PostgreSQL is unreachable, and ``serving_metrics`` serves over real HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from scrape import Scrape
from tills import until

from agent.documents import receipt
from conftest import Enroll
from faults import FaultProxy
from tillsync_agent import Agent, load_settings
from tillsync_central.db import create_pool
from tillsync_central.fleet_snapshot import REGISTER_STATES, offline_after_s
from tillsync_central.metrics import build_registry, metrics_app, serving_metrics
from tillsync_central.presence import PresenceWorker
from tillsync_central.provisioning import Enrollment
from tillsync_central.runner import CentralService
from tillsync_central.settings import CentralSettings
from tillsync_central.settings import load_settings as central_settings
from tillsync_protocol import CONTENT_TYPE, ConfigError, topology

INTERVAL = 0.3


@pytest.fixture
def fast_settings(settings: CentralSettings) -> CentralSettings:
    """Central with the agents' heartbeat interval: offline after 0.9 s of silence."""
    return settings.model_copy(update={"heartbeat_interval_s": INTERVAL})


@pytest.fixture
async def presence(
    fast_settings: CentralSettings, pool: asyncpg.Pool, declared: None
) -> AsyncIterator[PresenceWorker]:
    worker = PresenceWorker(fast_settings, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping))
    await asyncio.wait_for(worker.connected.wait(), timeout=30)
    yield worker
    stopping.set()
    await asyncio.wait_for(task, timeout=30)


async def scrape_app(app: Any) -> Scrape:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://central") as client:
        response = await client.get("/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape.parse(response.text)


def agent_settings(enrollment: Enrollment, data_dir: Path) -> Any:
    return load_settings(
        None,
        register_id=enrollment.register_id,
        center_id=enrollment.center_id,
        amqp_url=enrollment.amqp_url,
        data_dir=data_dir,
        heartbeat_interval_s=INTERVAL,
        ack_timeout_s=3600.0,
        reconnect_base_s=0.2,
        reconnect_cap_s=1.0,
    )


async def test_fleet_gauges_follow_a_real_agents_heartbeats(
    enroll: Enroll,
    presence: PresenceWorker,
    fast_settings: CentralSettings,
    pool: asyncpg.Pool,
    tmp_path: Path,
) -> None:
    talking = await enroll("c-metrics")
    silent = await enroll("c-metrics")
    elsewhere = await enroll("c-other")
    app = metrics_app(build_registry(pool, fast_settings, process=False))

    first = await scrape_app(app)
    assert first.value("tillsync_metrics_db_up") == 1
    assert first.value("tillsync_registers", center="c-metrics", state="never_seen") == 2
    assert first.value("tillsync_registers", center="c-other", state="never_seen") == 1
    for state in REGISTER_STATES:  # every state has a series, zeros included
        assert first.value("tillsync_registers", center="c-metrics", state=state) is not None
    assert first.value("tillsync_registers", center="c-metrics", state="online") == 0

    # No ingest worker runs: the broker confirms the documents and keeps them in
    # tillsync.ingest, so the register reports 7 pending in every heartbeat.
    async with Agent(agent_settings(talking, tmp_path)) as agent:
        for n in range(7):
            await agent.submit("receipt", receipt(100 + n, receipt_no=f"R-{n}"))
        run = asyncio.create_task(agent.run())
        try:

            async def online_with_seven() -> bool:
                now = await scrape_app(app)
                return (
                    now.value("tillsync_registers", center="c-metrics", state="online") == 1
                    and now.value(
                        "tillsync_registers_pending_documents", center="c-metrics", state="online"
                    )
                    == 7
                )

            await until(online_with_seven, timeout=30)
            now = await scrape_app(app)
            stored = await pool.fetchval(
                "SELECT sum(pending) FROM register_presence WHERE register_id = $1",
                talking.register_id,
            )
            # Both ends: the register's outbox, central's table and the gauge agree.
            assert agent.outbox.counts.pending == stored == 7
            assert now.total("tillsync_registers_pending_documents") == 7
            assert now.total("tillsync_registers_rejected_documents") == 0
            assert now.value("tillsync_registers", center="c-metrics", state="never_seen") == 1
            assert now.value("tillsync_registers", center="c-other", state="never_seen") == 1
        finally:
            agent.stop()
            await asyncio.wait_for(run, timeout=30)

    async def offline() -> bool:
        now = await scrape_app(app)
        return now.value("tillsync_registers", center="c-metrics", state="offline") == 1

    await until(offline, timeout=10, interval=0.1)
    after = await scrape_app(app)
    assert after.value("tillsync_registers", center="c-metrics", state="online") == 0
    # What will arrive when it comes back: still counted, now under offline.
    assert after.value("tillsync_registers_pending_documents", center="c-metrics", state="offline")
    assert after.total("tillsync_registers_pending_documents") == 7
    assert after.total("tillsync_registers") == 3
    del silent, elsewhere


async def test_refused_heartbeats_are_dead_letters_by_code(
    enroll: Enroll,
    presence: PresenceWorker,
    fast_settings: CentralSettings,
    pool: asyncpg.Pool,
) -> None:
    enrollment = await enroll()
    app = metrics_app(build_registry(pool, fast_settings, process=False))
    connection = await aio_pika.connect(enrollment.amqp_url, timeout=15)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.PRESENCE_EXCHANGE, ensure=False)
        key = f"hb.{enrollment.center_id}.{enrollment.register_id}"
        for n in range(3):
            message = aio_pika.Message(
                b"\xc1not a heartbeat %d" % n,
                content_type=CONTENT_TYPE,
                user_id=enrollment.broker_user,
            )
            await exchange.publish(message, key, timeout=10)

    async def three_refused() -> bool:
        return presence.stats.refused == 3

    await until(three_refused, timeout=30)
    rows = await pool.fetch(
        "SELECT code, count(*) AS n FROM dead_letters WHERE source = 'presence' GROUP BY code"
    )
    [row] = rows
    now = await scrape_app(app)
    assert (
        now.value("tillsync_dead_letters", source="presence", code=row["code"], status="new")
        == row["n"]
        == 3
    )


async def test_a_scrape_answers_while_postgresql_is_unreachable(
    fast_settings: CentralSettings, declared: None
) -> None:
    database = urlsplit(fast_settings.database_url.get_secret_value())
    assert database.hostname is not None
    assert database.port is not None
    async with FaultProxy(database.hostname, database.port) as proxy:
        through_proxy = fast_settings.model_copy(
            update={
                "database_url": SecretStr(proxy.url_for(database.geturl())),
                "db_connect_timeout": 1.0,
            }
        )
        pool = await create_pool(through_proxy)
        try:
            service = CentralService(through_proxy, pool)  # built, not run: counters at 0
            app = metrics_app(build_registry(pool, through_proxy, service=service, db_timeout=1.0))
            healthy = await scrape_app(app)
            assert healthy.value("tillsync_metrics_db_up") == 1
            assert healthy.value("tillsync_relay_lag_changes", scope="global") == 0

            for fault in (proxy.blackhole, proxy.cut):  # silent, then refused
                fault()
                started = time.monotonic()
                down = await scrape_app(app)
                took = time.monotonic() - started
                assert took < 3.0, f"{fault.__name__}: the scrape took {took:.1f} s"
                assert down.value("tillsync_metrics_db_up") == 0, fault.__name__
                # The fleet gauges are left out (not stale), the process's own are there.
                assert "tillsync_registers" not in down.families
                assert down.value("tillsync_ingest_stored_total") == 0
                assert down.value("tillsync_ingest_batch_seconds_count") == 0
                assert down.value("process_cpu_seconds_total") is not None
                proxy.heal()

            async def back() -> bool:
                return (await scrape_app(app)).value("tillsync_metrics_db_up") == 1

            await until(back, timeout=15, interval=0.2)
        finally:
            pool.terminate()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_serving_metrics_on_its_own_listener(
    fast_settings: CentralSettings, pool: asyncpg.Pool
) -> None:
    port = free_port()
    settings = fast_settings.model_copy(update={"metrics_port": port})
    service = CentralService(settings, pool)
    async with serving_metrics(settings, service) as served:
        assert served == port
        async with httpx.AsyncClient(timeout=10) as client:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
        assert response.status_code == 200
        scrape = Scrape.parse(response.text)
        assert scrape.value("tillsync_metrics_db_up") == 1
        assert scrape.value("tillsync_workers_healthy") == 0  # built, not running
        assert scrape.value("tillsync_ingest_deliveries_total") == 0

        # A second listener on the same port is a configuration error naming the field.
        with pytest.raises(ConfigError) as raised:
            async with serving_metrics(settings, service):
                pass
        assert raised.value.field == "metrics_port"
        assert str(port) in raised.value.reason

    # Stopped: the port is free again.
    with socket.create_server(("127.0.0.1", port)):
        pass
    for off in (None, 0):
        async with serving_metrics(settings.model_copy(update={"metrics_port": off})) as served:
            assert served is None


def test_metrics_settings_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TILLSYNC_METRICS_PORT", "70000")
    with pytest.raises(ConfigError) as raised:
        central_settings()
    assert raised.value.field == "metrics_port"
    monkeypatch.setenv("TILLSYNC_METRICS_PORT", "9464")
    monkeypatch.setenv("TILLSYNC_METRICS_DB_TIMEOUT_S", "0")
    with pytest.raises(ConfigError) as raised:
        central_settings()
    assert raised.value.field == "metrics_db_timeout_s"
    monkeypatch.delenv("TILLSYNC_METRICS_DB_TIMEOUT_S")
    settings = central_settings()
    assert (settings.metrics_host, settings.metrics_port) == ("127.0.0.1", 9464)
    assert offline_after_s(settings) == 3 * settings.heartbeat_interval_s


_SEED = """
INSERT INTO centers (center_id, name)
SELECT 'center-' || c, 'Center ' || c FROM generate_series(1, 50) AS c;
INSERT INTO registers (register_id, center_id, broker_user, revoked_at)
SELECT 'reg-' || r, 'center-' || (1 + r % 50), 'reg-reg-' || r,
       CASE WHEN r % 100 = 0 THEN now() END
FROM generate_series(1, 1000) AS r;
INSERT INTO register_presence (register_id, last_seen, sent_at, agent_version, pending,
                               rejected, acknowledged, last_seq, heartbeat)
SELECT 'reg-' || r, now() - make_interval(secs => r % 120), now(), '1.0', r % 7, r % 3,
       r * 10, r * 10, '{}'::jsonb
FROM generate_series(1, 900) AS r;
INSERT INTO dead_letters (source, code, reason, payload)
SELECT 'ingest', (ARRAY['malformed', 'unknown_register', 'identity_mismatch'])[1 + d % 3],
       'seeded', convert_to('payload ' || d, 'UTF8')
FROM generate_series(1, 20000) AS d;
UPDATE catalog_scopes SET last_seq = 10;
"""


async def test_a_scrape_of_a_thousand_registers_stays_cheap(
    fast_settings: CentralSettings, pool: asyncpg.Pool
) -> None:
    """1,000 registers in 50 centers, 20,000 dead letters, 51 lagging scopes: every
    gauge is right, and a scrape's queries take a fraction of their 2 s budget."""
    await pool.execute(_SEED)
    settings = fast_settings.model_copy(update={"heartbeat_interval_s": 15.0})  # 45 s
    app = metrics_app(build_registry(pool, settings, service=CentralService(settings, pool)))
    await scrape_app(app)  # the first one connects
    timings, walls = [], []
    for _ in range(20):
        started = time.perf_counter()
        scrape = await scrape_app(app)
        walls.append(time.perf_counter() - started)
        timings.append(scrape.value("tillsync_metrics_db_seconds") or 0.0)
    expected = await pool.fetchrow(
        """SELECT count(*) FILTER (WHERE r.revoked_at IS NULL AND p.last_seen
                                   >= now() - interval '45 seconds') AS online,
                  count(*) FILTER (WHERE r.revoked_at IS NOT NULL) AS revoked,
                  sum(p.pending) AS pending
           FROM registers r LEFT JOIN register_presence p USING (register_id)"""
    )
    # The clock moves between the two reads: compare what cannot move.
    assert scrape.total("tillsync_registers") == 1000
    assert scrape.total("tillsync_registers", state="revoked") == expected["revoked"] == 10
    assert scrape.total("tillsync_registers", state="never_seen") == 100 - 1  # reg-1000 revoked
    assert abs(scrape.total("tillsync_registers", state="online") - expected["online"]) <= 20
    assert scrape.total("tillsync_registers_pending_documents") == expected["pending"]
    assert len(scrape.series("tillsync_registers")) == 50 * len(REGISTER_STATES)
    assert scrape.total("tillsync_dead_letters", status="new") == 20_000
    assert len(scrape.series("tillsync_relay_lag_changes")) == 51
    assert scrape.total("tillsync_relay_lag_changes") == 51 * 10
    timings.sort()
    median, worst = timings[len(timings) // 2], timings[-1]
    walls.sort()
    print(
        f"1,000 registers: queries median {median:.4f} s, max {worst:.4f} s; "
        f"whole scrape median {walls[len(walls) // 2]:.4f} s"
    )
    assert median < 0.5, timings
