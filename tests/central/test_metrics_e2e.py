"""``/metrics`` of the real ``tillsync-central run`` (a subprocess on its own listener),
counted against both ends: what real agents sent and central stored, a garbage message as
a dead letter by code, presence from real heartbeats, and the relay's catalog changes."""

# ruff: noqa: F811  (tests take the imported ``central`` fixture as a parameter)
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from scrape import Scrape
from tills import Till

from agent.documents import receipt
from e2e.catalog_helpers import churn, edit
from e2e.conftest import (
    BIN,
    Central,
    agent_settings,
    central,  # noqa: F401  (the fixture; central_env turns metrics on)
    running_agent,
    wait_for,
)
from register_ids import reg
from services import Services
from tillsync_agent import Agent

HEARTBEAT_S = 0.3
CENTRAL_HEARTBEAT_S = 1.0  # central calls a register offline after 3 s of silence


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def central_env() -> dict[str, str]:
    return {
        "TILLSYNC_METRICS_PORT": str(free_port()),
        "TILLSYNC_HEARTBEAT_INTERVAL_S": str(CENTRAL_HEARTBEAT_S),
        # The reconciler's passes fold the agents' sales into stock_levels, catalog changes
        # of their own; the relay's work is counted exactly here, so after its pass at
        # start-up (nothing to fold yet) the reconciler runs no other.
        "TILLSYNC_RECONCILE_INTERVAL_S": "86400",
    }


async def scrape(central: Central) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(central.metrics_url)
    assert response.status_code == 200, response.text
    return Scrape.parse(response.text)


async def until_scrape(
    central: Central, what: str, check: Callable[[Scrape], bool], timeout: float = 30
) -> Scrape:
    """Scrape until ``check(scrape)`` is true; the last scrape."""
    last: list[Scrape] = []

    async def ok() -> bool:
        last[:] = [await scrape(central)]
        return check(last[0])

    await wait_for(ok, timeout=timeout, what=what, interval=0.2)
    return last[0]


async def sell(agent: Agent, n: int) -> None:
    for i in range(n):
        await agent.submit("receipt", receipt(100 + i, receipt_no=f"R-{i}"))


async def test_counters_and_gauges_match_both_ends(central: Central, tmp_path: Path) -> None:
    a = await central.provision("c-1", reg("r-1"))
    b = await central.provision("c-2", reg("r-2"))
    await central.provision("c-1", reg("r-never"))

    start = await until_scrape(
        central, "the relay to be active", lambda s: s.value("tillsync_relay_active") == 1
    )
    assert start.value("tillsync_metrics_db_up") == 1
    assert start.value("tillsync_workers_healthy") == 1
    assert start.value("tillsync_ingest_stored_total") == 0
    assert start.value("tillsync_registers", center="c-1", state="never_seen") == 2
    assert start.value("tillsync_registers", center="c-2", state="never_seen") == 1

    # Two real agents sell; central stores and acknowledges everything.
    async with (
        running_agent(
            agent_settings(a, tmp_path / "a", heartbeat_interval_s=HEARTBEAT_S)
        ) as agent_a,
        running_agent(
            agent_settings(b, tmp_path / "b", heartbeat_interval_s=HEARTBEAT_S)
        ) as agent_b,
    ):
        await asyncio.gather(sell(agent_a, 30), sell(agent_b, 20))

        async def drained() -> bool:
            return agent_a.outbox.counts.pending == 0 and agent_b.outbox.counts.pending == 0

        await wait_for(drained, timeout=60, what="both registers to drain")
        # The next heartbeats say so: both online, nothing pending.
        both_online = await until_scrape(
            central,
            "both registers online with nothing pending",
            lambda s: (
                s.value("tillsync_registers", center="c-1", state="online") == 1
                and s.value("tillsync_registers", center="c-2", state="online") == 1
                and s.total("tillsync_registers_pending_documents") == 0
                and s.total("tillsync_heartbeats_stored_total") >= 4
            ),
        )
        acknowledged = agent_a.outbox.counts.acknowledged + agent_b.outbox.counts.acknowledged
    stored = await central.stored()
    assert both_online.value("tillsync_ingest_stored_total") == stored == acknowledged == 50
    counted = (
        both_online.value("tillsync_ingest_stored_total") or 0,
        both_online.value("tillsync_ingest_duplicates_total") or 0,
        both_online.value("tillsync_ingest_conflicts_total") or 0,
        both_online.value("tillsync_ingest_refused_total") or 0,
    )
    assert both_online.value("tillsync_ingest_documents_total") == sum(counted)
    # A document_batch is one delivery of several documents.
    deliveries = both_online.value("tillsync_ingest_deliveries_total")
    assert deliveries is not None
    assert 1 <= deliveries <= sum(counted)
    assert counted[2:] == (0, 0)
    batches = both_online.value("tillsync_ingest_batches_total")
    assert batches is not None
    assert 1 <= batches <= 50
    assert both_online.value("tillsync_ingest_batch_seconds_count") == batches
    assert (both_online.value("tillsync_ingest_acks_published_total") or 0) >= 2
    assert both_online.value("tillsync_heartbeats_refused_total") == 0
    assert both_online.value("tillsync_registers", center="c-1", state="never_seen") == 1
    presence_rows = await central.pool.fetchval("SELECT count(*) FROM register_presence")
    assert presence_rows == 2

    # A garbage message from a real register's login: refused, and a dead letter by code.
    async with Till(a) as till:
        await till.publish(b"\x00 this is not MessagePack")
    refused = await until_scrape(
        central,
        "the garbage to be refused",
        lambda s: (
            s.value("tillsync_ingest_refused_total") == 1 and s.total("tillsync_dead_letters") == 1
        ),
    )
    [letter] = await central.pool.fetch("SELECT source, code, status FROM dead_letters")
    assert (
        refused.value(
            "tillsync_dead_letters",
            source=letter["source"],
            code=letter["code"],
            status=letter["status"],
        )
        == 1
    )
    assert (letter["source"], letter["status"]) == ("ingest", "new")
    assert refused.value("tillsync_ingest_stored_total") == 50

    # The agents stopped: three of central's heartbeat intervals later, both are offline.
    offline = await until_scrape(
        central,
        "both registers offline",
        lambda s: (
            s.value("tillsync_registers", center="c-1", state="offline") == 1
            and s.value("tillsync_registers", center="c-2", state="offline") == 1
        ),
        timeout=20,
    )
    assert offline.total("tillsync_registers", state="online") == 0

    # Catalog changes: the relay publishes them all and its lag falls back to 0.
    before = offline.value("tillsync_relay_published_total") or 0
    written = await edit(central, churn(40, "c-1"))
    relayed = await until_scrape(
        central,
        "the relay to publish every change",
        lambda s: (
            s.value("tillsync_relay_published_total") == before + written
            and s.total("tillsync_relay_lag_changes") == 0
        ),
    )
    heads = await central.pool.fetch("SELECT scope, last_seq FROM catalog_scopes")
    published = {
        row["scope"]: row["published_seq"]
        for row in await central.pool.fetch("SELECT scope, published_seq FROM relay_positions")
    }
    for row in heads:
        assert published.get(row["scope"], 0) == row["last_seq"]
        assert relayed.value("tillsync_relay_lag_changes", scope=row["scope"]) == 0
        assert relayed.value("tillsync_relay_lag_seconds", scope=row["scope"]) == 0

    # SIGTERM stops the metrics listener with the workers, cleanly.
    assert await central.stop() == 0
    log = central.log_path.read_text()
    assert "metrics listening" in log
    with pytest.raises(httpx.ConnectError):
        await scrape(central)


async def test_run_refuses_a_taken_metrics_port(
    services: Services, fresh_vhost: str, make_database: Any
) -> None:
    database_url = await make_database()
    try:
        with socket.create_server(("127.0.0.1", 0)) as taken:
            port = taken.getsockname()[1]
            env = {
                **os.environ,
                "TILLSYNC_AMQP_URL": fresh_vhost,
                "TILLSYNC_DATABASE_URL": database_url,
                "TILLSYNC_RABBITMQ_API_URL": services.rabbitmq_api_url,
                "TILLSYNC_METRICS_PORT": str(port),
            }
            result = await asyncio.to_thread(
                subprocess.run,
                [str(BIN / "tillsync-central"), "run"],
                env=env,
                capture_output=True,
                timeout=120,
            )
    finally:
        await make_database.drop(database_url)
    stderr = result.stderr.decode()
    assert result.returncode == 1, stderr
    assert "code=config_error field=metrics_port" in stderr
    assert f"127.0.0.1:{port}" in stderr
