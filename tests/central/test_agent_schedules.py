"""The agent's schedules against the real broker and central's catalog RPC: on start-up
both the documents sweep (everything open is published at once) and the catalog check (a
``start-up`` delta) run; afterwards the catalog check runs at the interval its setting
names, and with an hourly setting nothing more happens within seconds.

No ingest worker runs here, so nothing is ever acknowledged: every publish of a document
stays in ``tillsync.ingest``, and its depth counts the agent's publishes exactly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from tills import until

from agent.documents import receipt
from conftest import Enroll
from tillsync_agent import Agent, load_settings
from tillsync_agent.history import read_runs
from tillsync_agent.store import open_readonly
from tillsync_central.catalog_rpc import CatalogRpcWorker
from tillsync_central.provisioning import Enrollment
from tillsync_central.settings import CentralSettings
from tillsync_protocol import topology

DOCUMENTS = 4


@pytest.fixture
async def catalog_rpc(
    settings: CentralSettings, pool: asyncpg.Pool, declared: None
) -> AsyncIterator[CatalogRpcWorker]:
    worker = CatalogRpcWorker(settings, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping))
    await asyncio.wait_for(worker.connected.wait(), timeout=30)
    yield worker
    stopping.set()
    await asyncio.wait_for(task, timeout=30)


async def ingest_depth(settings: CentralSettings) -> int:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=15)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(topology.INGEST_QUEUE, passive=True)
        return int(queue.declaration_result.message_count or 0)


def triggers(data_dir: Path) -> list[str]:
    with open_readonly(data_dir / "agent.sqlite3") as db:
        runs = read_runs(db)
    return [str(run.detail.get("trigger")) for run in runs if run.kind == "catalog_delta"]


async def started_agent(enrollment: Enrollment, data_dir: Path, interval: float) -> Agent:
    values: dict[str, Any] = {
        "register_id": enrollment.register_id,
        "center_id": enrollment.center_id,
        "amqp_url": enrollment.amqp_url,
        "data_dir": data_dir,
        "ack_timeout_s": 3600.0,  # only the sweep may publish a document again
        "publish_batch_max": 1,  # a message per document: the queue's depth counts them
        "sweep_interval_s": interval,
        "catalog_check_interval_s": interval,
    }
    agent = Agent(load_settings(None, **values))
    await agent.__aenter__()
    for n in range(DOCUMENTS):  # stored before the agent runs: only a sweep can send them
        await agent.submit("receipt", receipt(100 + n, receipt_no=f"R-{n}"))
    return agent


@pytest.mark.parametrize("interval", [3600.0, 0.5], ids=["hourly", "twice-a-second"])
async def test_start_up_runs_both_and_the_intervals_come_from_the_settings(
    enroll: Enroll,
    catalog_rpc: CatalogRpcWorker,
    settings: CentralSettings,
    tmp_path: Path,
    interval: float,
) -> None:
    enrollment = await enroll()
    agent = await started_agent(enrollment, tmp_path, interval)
    run = asyncio.create_task(agent.run())
    try:

        async def started_both() -> bool:
            return await ingest_depth(settings) >= DOCUMENTS and "start-up" in triggers(tmp_path)

        # Both within seconds of the start, long before an hourly interval.
        await until(started_both, timeout=20)
        await asyncio.sleep(3)
        depth = await ingest_depth(settings)
        periodic = triggers(tmp_path).count("periodic check")
        if interval > 60:
            assert depth == DOCUMENTS  # published once, at start-up
            assert periodic == 0
        else:
            # How often the documents sweep publishes again depends on how long a sweep
            # waits for acks (the sync history's documents runs): only "at least once" is
            # common to every version; the catalog check's interval is exact.
            assert depth >= DOCUMENTS
            assert periodic >= 3, triggers(tmp_path)
        assert agent.outbox.counts.pending == DOCUMENTS
    finally:
        agent.stop()
        await asyncio.wait_for(run, timeout=30)
        await agent.__aexit__(None, None, None)
