"""The sender's round against a real SQLite file: ``take_due`` (rows from memory when
nothing older can be due) and the deferred publish records of ``mark_published``.

The reference is always the table itself: whatever ``take_due`` hands out must be exactly
what a fresh read of the table (``due``) returns at that moment.
"""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

from tillsync_agent.outbox import Outbox, OutboxRow, now_ms
from tillsync_agent.store import Store
from tillsync_protocol import AckBody, SeqRange

from .documents import receipt, shift_close

LIMIT = 8
FAR = 3_600_000  # an hour: not due again within a test


async def open_outbox(store: Store) -> Outbox:
    outbox = Outbox(store, register_id="r-1", center_id="c-1")
    await outbox.load()
    return outbox


def rows_in_file(path: Path) -> dict[int, tuple[str, int | None, int | None]]:
    """seq → (state, last_sent_at, next_attempt_at), read by another connection."""
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT seq, state, last_sent_at, next_attempt_at FROM outbox")
        return {seq: (state, sent, next_at) for seq, state, sent, next_at in rows}


def payloads_in_file(path: Path) -> dict[int, bytes]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT seq, payload FROM outbox").fetchall())


async def publish_round(outbox: Outbox, rows: list[OutboxRow], wait_ms: int = FAR) -> None:
    now = now_ms()
    await outbox.mark_published([(row.seq, now + wait_ms) for row in rows], now)


async def test_new_rows_come_from_memory_in_seq_order_with_their_exact_bytes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.db"
    async with Store(path) as store:
        outbox = await open_outbox(store)
        assert await outbox.take_due(LIMIT) == []  # reads the table: the view starts
        for _ in range(3):
            await outbox.submit("receipt", receipt())
        first = await outbox.take_due(LIMIT)
        assert [row.seq for row in first] == [1, 2, 3]
        await publish_round(outbox, first)
        await outbox.submit_many([("receipt", receipt()), ("receipt", receipt())])
        second = await outbox.take_due(LIMIT)
        assert [row.seq for row in second] == [4, 5]
        await publish_round(outbox, second)
        assert await outbox.take_due(LIMIT) == []
        assert await outbox.due(LIMIT) == []  # the table agrees
        stored = payloads_in_file(path)
        assert {row.seq: row.payload for row in first + second} == stored
        assert all(row.attempts == 0 for row in first + second)
        await outbox.close()
    # Both ends: every handed-out row is recorded as published in the file.
    assert {seq: state for seq, (state, _, _) in rows_in_file(path).items()} == {
        n: "published" for n in range(1, 6)
    }


async def test_make_due_and_a_resend_time_bring_older_rows_first(tmp_path: Path) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        await outbox.take_due(LIMIT)
        await outbox.submit_many([("receipt", receipt())] * 3)
        await publish_round(outbox, await outbox.take_due(LIMIT))
        await outbox.make_due()  # a reconnect: everything open goes again, oldest first
        await outbox.submit("receipt", receipt())
        assert [row.seq for row in await outbox.take_due(LIMIT)] == [1, 2, 3, 4]
        # Published with an ack timeout already over: due again before any new row.
        now = now_ms()
        await outbox.mark_published([(1, now - 1), (2, now + FAR), (3, now + FAR)], now)
        await outbox.mark_failed([(4, now - 1)])
        await outbox.submit("receipt", receipt())
        assert [row.seq for row in await outbox.take_due(LIMIT)] == [1, 4, 5]


async def test_a_round_never_recorded_is_read_again_from_the_table(tmp_path: Path) -> None:
    """A round cancelled before its confirms were recorded (the link went down) must not
    be forgotten by the memory view."""
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        await outbox.take_due(LIMIT)
        await outbox.submit_many([("receipt", receipt())] * 2)
        assert [row.seq for row in await outbox.take_due(LIMIT)] == [1, 2]
        await outbox.submit("receipt", receipt())
        assert [row.seq for row in await outbox.take_due(LIMIT)] == [1, 2, 3]


async def test_more_rows_than_a_round_overflow_to_the_table_in_order(tmp_path: Path) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        await outbox.take_due(LIMIT)
        await outbox.submit_many([("receipt", receipt())] * (2 * LIMIT + 3))
        seen: list[int] = []
        while rows := await outbox.take_due(LIMIT):
            assert len(rows) <= LIMIT
            seen.extend(row.seq for row in rows)
            await publish_round(outbox, rows)
        assert seen == list(range(1, 2 * LIMIT + 4))


async def test_a_shift_close_makes_its_stale_rows_due_before_it(tmp_path: Path) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        await outbox.take_due(LIMIT)
        await outbox.submit_many([("receipt", receipt(shift_no=7))] * 2)
        rows = await outbox.take_due(LIMIT)
        long_ago = now_ms() - 120_000  # sent two minutes ago, no ack since
        await outbox.mark_published([(row.seq, now_ms() + FAR) for row in rows], long_ago)
        close = await outbox.submit("shift_close", shift_close(7, 1, 2, 2, 24_200))
        assert [row.seq for row in await outbox.take_due(LIMIT)] == [1, 2, close.seq]


async def test_publish_records_ride_with_the_next_ack_or_are_flushed(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with Store(path) as store:
        outbox = await open_outbox(store)
        await outbox.take_due(LIMIT)
        await outbox.submit_many([("receipt", receipt())] * 4)
        rows = await outbox.take_due(LIMIT)
        sent_at = now_ms()
        await outbox.mark_published([(row.seq, sent_at + FAR) for row in rows], sent_at)
        # Not written yet: nothing to fsync in the sender's round.
        assert {state for state, _, _ in rows_in_file(path).values()} == {"pending"}
        await outbox.apply_ack(AckBody(register_id="r-1", accepted=[SeqRange(first=1, last=2)]))
        # The ack's transaction wrote the records first, then the ack.
        in_file = rows_in_file(path)
        assert [in_file[seq][0] for seq in (1, 2, 3, 4)] == [
            "acknowledged",
            "acknowledged",
            "published",
            "published",
        ]
        assert {in_file[seq][1] for seq in (1, 2, 3, 4)} == {sent_at}
        assert (outbox.counts.pending, outbox.counts.acknowledged) == (2, 2)
        # Records alone are written by the flush (the timer's, or close's).
        await outbox.submit("receipt", receipt())
        await publish_round(outbox, await outbox.take_due(LIMIT))
        assert rows_in_file(path)[5][0] == "pending"
        await outbox.flush()
        assert rows_in_file(path)[5][0] == "published"
        # ... committed with synchronous=NORMAL, and FULL is back for everything else.
        mode = await store.in_thread(lambda db: db.execute("PRAGMA synchronous").fetchone())
        assert mode == (2,)


async def test_records_lost_in_a_crash_only_make_their_rows_due_again(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    async with Store(path) as store:
        outbox = await open_outbox(store)
        await outbox.take_due(LIMIT)
        await outbox.submit_many([("receipt", receipt())] * 3)
        await publish_round(outbox, await outbox.take_due(LIMIT))
        # The store closes without outbox.close(): a SIGKILL before any flush.
    async with Store(path) as store:
        outbox = await open_outbox(store)
        assert outbox.counts.pending == 3
        assert [row.seq for row in await outbox.take_due(LIMIT)] == [1, 2, 3]


async def test_take_due_always_matches_a_fresh_read_of_the_table(tmp_path: Path) -> None:
    """Random interleavings of submits (single, grouped, shift closes), rounds recorded as
    published or failed (resend times already over or far away), rounds never recorded,
    make_due (all or a range), acks and flushes: at every round, take_due hands out
    exactly what the table says is due."""
    for seed in range(12):
        rng = random.Random(seed)
        async with Store(tmp_path / f"{seed}.db") as store:
            outbox = await open_outbox(store)
            for _ in range(120):
                op = rng.random()
                if op < 0.35:
                    count = rng.choice([1, 1, 2, 5, LIMIT + 1])
                    await outbox.submit_many([("receipt", receipt(shift_no=1))] * count)
                elif op < 0.37:
                    await outbox.submit("shift_close", shift_close(1, 1, 1, 1, 12_100))
                elif op < 0.41:
                    last = outbox.counts.last_seq
                    if rng.random() < 0.5 or last == 0:
                        await outbox.make_due()
                    else:
                        first = rng.randint(1, last)
                        await outbox.make_due(first=first, last=rng.randint(first, last))
                elif op < 0.49:
                    last = outbox.counts.last_seq
                    if last:
                        first = rng.randint(1, last)
                        ack = AckBody(
                            register_id="r-1",
                            accepted=[SeqRange(first=first, last=rng.randint(first, last))],
                        )
                        await outbox.apply_ack(ack)
                elif op < 0.52:
                    await outbox.flush()
                else:
                    expected = await outbox.due(LIMIT)
                    rows = await outbox.take_due(LIMIT)
                    assert rows == expected, f"seed {seed}"
                    if not rows:
                        continue
                    now = now_ms()
                    results = [(row.seq, now + rng.choice([-1, FAR, FAR, FAR])) for row in rows]
                    fate = rng.random()
                    if fate < 0.75:
                        await outbox.mark_published(results, now)
                    elif fate < 0.9:
                        await outbox.mark_failed(results)
                    # else: never recorded (a round cut short)
            await outbox.close()
            async with store.write_lock:
                pass
        # Both ends: the counters are what the file holds.
        with sqlite3.connect(tmp_path / f"{seed}.db") as db:
            states = dict(db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state"))
        assert states.get("pending", 0) + states.get("published", 0) == outbox.counts.pending
        assert states.get("acknowledged", 0) == outbox.counts.acknowledged
