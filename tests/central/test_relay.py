"""The relay against real PostgreSQL and RabbitMQ: every committed change reaches a queue
bound like a register's, in scope_seq order, exactly once while nothing fails; a relay
SIGKILLed mid-stream and restarted republishes only what it had not recorded, byte for
byte, and the final state rebuilt from the messages equals central's."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from catalog_client import Inbox, declare_register_like_queue

from conftest import new_id
from tillsync_central.catalog import CatalogEditor, prepare_edit
from tillsync_central.relay import Relay, _message, change_msg_id
from tillsync_central.settings import CentralSettings
from tillsync_protocol import CatalogChange, CatalogChangeBody, decode_control, encode


def item(n: int, price: int) -> dict[str, Any]:
    return {"name": f"Item {n}", "gross_price": price, "currency": "CZK", "tax_rate_id": "t"}


async def _center(pool: asyncpg.Pool) -> str:
    center = new_id("c")
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO centers (center_id, name) VALUES ($1, $1)", center)
    return center


@pytest.fixture
async def relay(settings: CentralSettings, declared: None) -> AsyncIterator[Relay]:
    relay = Relay(settings, batch_size=300, poll_interval=0.5)
    stopping = asyncio.Event()
    task = asyncio.create_task(relay.run(stopping))
    await asyncio.wait_for(relay.active.wait(), 20)
    yield relay
    stopping.set()
    await asyncio.wait_for(task, 20)


def _by_scope(changes: list[CatalogChange]) -> dict[str, list[int]]:
    seqs: dict[str, list[int]] = defaultdict(list)
    for change in changes:
        seqs[change.body.scope].append(change.body.scope_seq)
    return seqs


async def _last_seq(pool: asyncpg.Pool, scope: str) -> int:
    async with pool.acquire() as conn:
        return int(
            await conn.fetchval("SELECT last_seq FROM catalog_scopes WHERE scope = $1", scope)
        )


async def test_every_change_reaches_a_register_queue_once_and_in_order(
    settings: CentralSettings, pool: asyncpg.Pool, relay: Relay
) -> None:
    center, other = await _center(pool), await _center(pool)
    url = settings.amqp_url.get_secret_value()
    queue = await declare_register_like_queue(url, new_id("r"), center)
    editor = CatalogEditor(pool)
    async with Inbox(url, queue) as inbox:
        for batch in range(10):
            await editor.apply(
                [prepare_edit("global", "items", f"i{n}", state=item(n, batch + 1))
                 for n in range(150)]
                + [prepare_edit(center, "stock_levels", f"i{n}", state={"qty_milli": batch})
                   for n in range(40)]
                + [prepare_edit(other, "stock_levels", "x", state={"qty_milli": batch})]
            )  # fmt: skip
        await editor.delete("global", "items", "i7")
        expected = {"global": 1501, center: 400}
        await inbox.wait(lambda i: len(i.changes()) >= sum(expected.values()))
        await asyncio.sleep(0.5)  # anything more would be a duplicate or a leak

        changes = inbox.changes()
        assert len(changes) == sum(expected.values())  # nothing twice, nothing of `other`
        assert _by_scope(changes) == {s: list(range(1, n + 1)) for s, n in expected.items()}
        last = changes[-1] if changes[-1].body.scope == "global" else None
        deletes = [c for c in changes if c.body.op == "delete"]
        assert [(c.body.key, c.body.state, c.body.version) for c in deletes] == [("i7", None, 11)]
        assert last is None or last.body.scope_seq == 1501
        for change in changes:
            assert change.msg_id == change_msg_id(change.body.scope, change.body.scope_seq)
        assert {r.routing_key for r in inbox.received} == {
            "cat.global.items",
            f"cat.{center}.stock_levels",
        }
    async with pool.acquire() as conn:
        positions = dict(await conn.fetch("SELECT scope, published_seq FROM relay_positions"))
    assert positions == {"global": 1501, center: 400, other: 10}
    assert relay.stats.published == 1911


async def test_a_second_relay_waits_and_takes_over(
    settings: CentralSettings, pool: asyncpg.Pool, relay: Relay
) -> None:
    standby = Relay(settings, poll_interval=0.3)
    stopping = asyncio.Event()
    task = asyncio.create_task(standby.run(stopping))
    try:
        await asyncio.sleep(1)
        assert relay.active.is_set()
        assert not standby.active.is_set()
    finally:
        stopping.set()
        await asyncio.wait_for(task, 10)


def _start_central(settings: CentralSettings, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "TILLSYNC_AMQP_URL": settings.amqp_url.get_secret_value(),
        "TILLSYNC_DATABASE_URL": settings.database_url.get_secret_value(),
        "TILLSYNC_RABBITMQ_API_URL": settings.rabbitmq_api_url.get_secret_value(),
    }
    env.pop("TILLSYNC_CONFIG", None)
    command = [str(Path(sys.executable).parent / "tillsync-central"), "run"]
    with log.open("ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)


async def _write_changes(pool: asyncpg.Pool, center: str, rounds: int) -> None:
    """Rounds of 100 changes: items in global, stock in the center, some deletes."""
    editor = CatalogEditor(pool, changed_by="writer")
    for r in range(rounds):
        edits = [
            prepare_edit("global", "items", f"i{(r * 70 + n) % 500}", state=item(n, r + 1))
            for n in range(70)
        ]
        edits += [
            prepare_edit(center, "stock_levels", f"s{n}", state={"qty_milli": r}) for n in range(25)
        ]
        edits += [prepare_edit("global", "items", f"i{(r * 5 + n) % 500}", "delete")
                  for n in range(5)]  # fmt: skip
        await editor.apply(edits)
        await asyncio.sleep(0.02)


@pytest.mark.slow
async def test_a_relay_killed_mid_stream_resumes_where_it_stopped(
    settings: CentralSettings, pool: asyncpg.Pool, declared: None, tmp_path: Path
) -> None:
    center = await _center(pool)
    url = settings.amqp_url.get_secret_value()
    queue = await declare_register_like_queue(url, new_id("r"), center)
    log = tmp_path / "central.log"
    await _write_changes(pool, center, 30)  # a backlog before the relay starts
    first = _start_central(settings, log)
    second: subprocess.Popen[bytes] | None = None
    try:
        async with Inbox(url, queue) as inbox:
            writing = asyncio.create_task(_write_changes(pool, center, 40))
            await inbox.wait(lambda i: len(i.changes()) >= 1500, timeout=60)
            first.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(first.wait, 10) == -signal.SIGKILL
            received_at_kill = len(inbox.changes())
            await writing
            totals = {s: await _last_seq(pool, s) for s in ("global", center)}
            assert received_at_kill < sum(totals.values()), "the kill came too late"

            second = _start_central(settings, log)
            await inbox.wait(
                lambda i: all(
                    set(range(1, n + 1)) <= set(_by_scope(i.changes())[s])
                    for s, n in totals.items()
                ),
                timeout=60,
            )
            await asyncio.sleep(0.5)
            _assert_exactly_once_in_effect(inbox, totals)
            await _assert_state_rebuilt(pool, inbox.changes())
            second.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 30) == 0, log.read_text()[-3000:]
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def _assert_exactly_once_in_effect(inbox: Inbox, totals: dict[str, int]) -> None:
    first_bytes: dict[tuple[str, int], bytes] = {}
    duplicates = 0
    for received in inbox.received:
        change = received.message
        assert isinstance(change, CatalogChange)
        key = (change.body.scope, change.body.scope_seq)
        if key in first_bytes:
            duplicates += 1
            assert received.body == first_bytes[key], "a duplicate must be a re-publication"
        else:
            first_bytes[key] = received.body
    assert set(first_bytes) == {(s, n) for s, last in totals.items() for n in range(1, last + 1)}
    # Duplicates come only from the batch in flight at the kill (at most one per scope).
    assert duplicates <= 2 * 1000
    # Within each scope, every first arrival is in order; a re-publication restarts at the
    # first unrecorded seq and moves forward again.
    for scope in totals:
        seqs = [c.body.scope_seq for c in inbox.changes() if c.body.scope == scope]
        restarts = sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
        assert restarts <= 1, seqs


async def _assert_state_rebuilt(pool: asyncpg.Pool, changes: list[CatalogChange]) -> None:
    """Apply the changes as a register does (one cursor per scope: the next seq is applied,
    an older one ignored, a gap would need a delta) and compare with central's rows."""
    replica: dict[tuple[str, str, str], tuple[int, Any]] = {}
    cursors: dict[str, int] = defaultdict(int)
    for change in changes:
        b = change.body
        if b.scope_seq <= cursors[b.scope]:
            continue
        assert b.scope_seq == cursors[b.scope] + 1, "a gap"
        cursors[b.scope] = b.scope_seq
        replica[(b.scope, b.entity, b.key)] = (b.version, b.state)
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT scope, entity, key, version, state FROM catalog_entities")
    assert {(r["scope"], r["entity"], r["key"]): (r["version"], r["state"]) for r in rows} == (
        replica
    )
    assert len(rows) > 500


@pytest.mark.parametrize(
    ("op", "state"),
    [
        ("upsert", {"name": "Žluté", "gross_price": 1290, "barcodes": ["1"], "x": {"y": None}}),
        ("delete", None),
    ],
)
def test_a_change_is_packed_byte_for_byte_as_the_models_encoding(
    op: str, state: dict[str, Any] | None
) -> None:
    changed_at = datetime(2026, 11, 29, 7, 0, 0, 123000, tzinfo=UTC)
    row = {"scope_seq": 42, "entity": "items", "key": "i-1", "op": op, "version": 7,
           "state": state, "changed_at": changed_at}  # fmt: skip
    message, key = _message("global", row)  # type: ignore[arg-type]
    expected = CatalogChange(
        msg_id=change_msg_id("global", 42),
        created_at=int(changed_at.timestamp() * 1000),
        body=CatalogChangeBody(
            scope="global", scope_seq=42, entity="items", key="i-1", op=op, version=7, state=state
        ),
    )
    assert message.body == encode(expected)
    assert decode_control(message.body) == expected
    assert (key, message.message_id, message.type) == (
        "cat.global.items",
        expected.msg_id,
        "catalog_change",
    )
