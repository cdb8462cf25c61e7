"""Ingest under faults: a worker process killed with SIGKILL, PostgreSQL restarted.

After each fault, both ends are counted: every published seq is stored exactly once
(rows == distinct seqs, nothing else), and every seq was acknowledged to its register.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
from tills import Till, canonical, until

from conftest import Enroll, new_id
from tillsync_central.runner import IngestService
from tillsync_central.settings import CentralSettings

PER_REGISTER = 1500


async def _publish_all(till: Till, count: int, concurrency: int = 64) -> None:
    """Publish seqs 1..count, many in flight, each confirmed by the broker."""
    raws = [till.document(seq) for seq in range(1, count + 1)]
    for start in range(0, count, concurrency):
        chunk = raws[start : start + concurrency]
        await asyncio.gather(
            *(till.publish(canonical(raw), message_id=raw["doc_id"]) for raw in chunk)
        )


async def _scalar(pool: asyncpg.Pool, sql: str, *args: Any) -> Any:
    """One value; retried while PostgreSQL is coming back."""
    async with asyncio.timeout(60):
        while True:
            try:
                async with pool.acquire() as conn:
                    return await conn.fetchval(sql, *args)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await asyncio.sleep(0.2)


async def _stored_at_least(pool: asyncpg.Pool, count: int) -> None:
    async def enough() -> bool:
        return int(await _scalar(pool, "SELECT count(*) FROM documents")) >= count

    await until(enough, timeout=60, interval=0.05)


async def _assert_exactly_once(pool: asyncpg.Pool, tills: list[Till], count: int) -> None:
    for till in tills:
        await till.wait_for(range(1, count + 1), timeout=120)
        assert till.acks.accepted == set(range(1, count + 1))
        assert till.acks.rejected == {}
        seqs = await _scalar(
            pool,
            "SELECT array_agg(seq ORDER BY seq) FROM documents WHERE register_id = $1",
            till.register_id,
        )
        assert seqs == list(range(1, count + 1))
        receipts = await _scalar(
            pool, "SELECT count(*) FROM receipts WHERE register_id = $1", till.register_id
        )
        assert receipts == count

        # register_state moves on right after the acks are published: poll for it.
        async def caught_up(register_id: str = till.register_id) -> bool:
            contiguous = await _scalar(
                pool,
                "SELECT contiguous_seq FROM register_state WHERE register_id = $1",
                register_id,
            )
            return bool(contiguous == count)

        await until(caught_up, timeout=30)
    assert await _scalar(pool, "SELECT count(*) FROM documents") == count * len(tills)
    assert await _scalar(pool, "SELECT count(*) FROM conflicts") == 0
    assert await _scalar(pool, "SELECT count(*) FROM dead_letters") == 0


def _start_central(settings: CentralSettings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TILLSYNC_AMQP_URL": settings.amqp_url.get_secret_value(),
        "TILLSYNC_DATABASE_URL": settings.database_url.get_secret_value(),
        "TILLSYNC_RABBITMQ_API_URL": settings.rabbitmq_api_url.get_secret_value(),
        "TILLSYNC_INGEST_BATCH_SIZE": "50",
        "TILLSYNC_INGEST_PREFETCH": "200",
    }
    env.pop("TILLSYNC_CONFIG", None)
    command = [str(Path(sys.executable).parent / "tillsync-central"), "run", "--workers", "2"]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


async def _wait_exit(process: subprocess.Popen[bytes], timeout: float) -> int:
    return await asyncio.wait_for(asyncio.to_thread(process.wait), timeout=timeout)


async def test_a_worker_killed_mid_stream_loses_and_doubles_nothing(
    settings: CentralSettings, enroll: Enroll, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    center = new_id("c")
    log = tmp_path / "central.log"
    first = _start_central(settings, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        async with Till(await enroll(center)) as a, Till(await enroll(center)) as b:
            publishing = asyncio.gather(
                _publish_all(a, PER_REGISTER), _publish_all(b, PER_REGISTER)
            )
            await _stored_at_least(pool, 400)
            first.send_signal(signal.SIGKILL)
            assert await _wait_exit(first, 10) == -signal.SIGKILL
            stored_at_kill = await _scalar(pool, "SELECT count(*) FROM documents")
            await publishing
            assert stored_at_kill < 2 * PER_REGISTER, "the kill came too late to prove anything"

            second = _start_central(settings, log)
            await _assert_exactly_once(pool, [a, b], PER_REGISTER)

            second.send_signal(signal.SIGTERM)  # a clean stop exits 0
            assert await _wait_exit(second, 30) == 0, log.read_text()[-3000:]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def _postgres_cluster() -> tuple[str, str]:
    lines = subprocess.run(
        ["pg_lsclusters", "-h"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    version, name = lines[0].split()[:2]
    return version, name


async def test_postgresql_restarted_while_ingesting_loses_nothing(
    settings: CentralSettings, enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    version, name = _postgres_cluster()
    center = new_id("c")
    async with Till(await enroll(center)) as a, Till(await enroll(center)) as b:
        publishing = asyncio.gather(_publish_all(a, PER_REGISTER), _publish_all(b, PER_REGISTER))
        await _stored_at_least(pool, 300)
        stored_before = await _scalar(pool, "SELECT count(*) FROM documents")
        assert stored_before < 2 * PER_REGISTER, "the restart came too late to prove anything"
        restart = await asyncio.to_thread(
            subprocess.run,
            ["pg_ctlcluster", version, name, "restart"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert restart.returncode == 0, restart.stderr
        await publishing
        await _assert_exactly_once(pool, [a, b], PER_REGISTER)
