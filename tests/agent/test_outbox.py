"""The outbox against a real SQLite file: dense seqs, exact counts, durability, one writer."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from tillsync_agent.outbox import Counts, Outbox, now_ms
from tillsync_agent.store import Store, StoreLockedError
from tillsync_protocol import (
    AckBody,
    FloatNotAllowedError,
    Rejection,
    SeqRange,
    TooLargeError,
    decode_document,
)

from .documents import receipt, shift_close


async def open_outbox(store: Store) -> Outbox:
    outbox = Outbox(store, register_id="r-1", center_id="c-1")
    await outbox.load()
    return outbox


def table_counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall()
    return dict(rows)


async def test_concurrent_submits_get_dense_seqs_and_exact_counts(tmp_path: Path) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        first = await asyncio.gather(*(outbox.submit("receipt", receipt()) for _ in range(300)))
        second = [await outbox.submit("receipt", receipt()) for _ in range(20)]
        seqs = sorted(s.seq for s in first + second)
        assert seqs == list(range(1, 321))
        assert len({s.doc_id for s in first + second}) == 320
        assert outbox.counts.pending == 320
        assert outbox.counts.last_seq == 320
    # Both ends: what the counters say is what the table holds.
    assert table_counts(tmp_path / "a.db") == {"pending": 320}


async def test_invalid_document_is_refused_with_code_and_field_and_uses_no_seq(
    tmp_path: Path,
) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        good = await outbox.submit("receipt", receipt())
        bad = receipt()
        bad["lines"][0]["unit_price"] = 1.5
        results = await asyncio.gather(
            outbox.submit("receipt", bad),
            outbox.submit("receipt", receipt()),
            return_exceptions=True,
        )
        assert isinstance(results[0], FloatNotAllowedError)
        assert results[0].field == "body.lines[0].unit_price"
        assert not isinstance(results[1], BaseException)
        assert results[1].seq == good.seq + 1
        assert outbox.counts.pending == 2


async def test_stored_bytes_are_a_valid_document_with_the_envelope(tmp_path: Path) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        submitted = await outbox.submit("receipt", receipt(500))
        (row,) = await outbox.due(10)
    document = decode_document(row.payload)
    assert (document.register_id, document.center_id, document.seq) == ("r-1", "c-1", 1)
    assert document.doc_id == submitted.doc_id
    assert abs(document.created_at - now_ms()) < 60_000


async def test_acks_and_rejections_update_counts_once(tmp_path: Path) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        for _ in range(10):
            await outbox.submit("receipt", receipt())
        ack = AckBody(
            register_id="r-1",
            accepted=[SeqRange(first=1, last=4), SeqRange(first=6, last=8)],
            rejected=[Rejection(seq=5, code="conflict", field="", reason="different content")],
        )
        assert await outbox.apply_ack(ack) == (7, 1)
        assert await outbox.apply_ack(ack) == (0, 0)  # a repeated ack changes nothing
        counts = outbox.counts
        assert (counts.pending, counts.acknowledged, counts.rejected) == (2, 7, 1)
        assert [r["seq"] for r in await outbox.rejected_documents()] == [5]
        assert [row.seq for row in await outbox.due(100)] == [9, 10]
    assert table_counts(tmp_path / "a.db") == {"acknowledged": 7, "rejected": 1, "pending": 2}


async def test_counts_survive_a_restart(tmp_path: Path) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        for _ in range(5):
            await outbox.submit("receipt", receipt())
        await outbox.apply_ack(AckBody(register_id="r-1", accepted=[SeqRange(first=1, last=2)]))
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        assert (outbox.counts.last_seq, outbox.counts.pending, outbox.counts.acknowledged) == (
            5,
            3,
            2,
        )
        assert (await outbox.submit("receipt", receipt())).seq == 6


async def test_a_second_writer_is_refused(tmp_path: Path) -> None:
    async with Store(tmp_path / "a.db"):
        with pytest.raises(StoreLockedError) as info:
            async with Store(tmp_path / "a.db"):
                pass
        assert info.value.code == "store_locked"


async def test_published_rows_wait_and_a_shift_close_makes_its_shift_due(tmp_path: Path) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        for _ in range(3):
            await outbox.submit("receipt", receipt(shift_no=7))
        await outbox.submit("receipt", receipt(shift_no=8))
        await outbox.submit("receipt", receipt(shift_no=7))
        far = now_ms() + 3_600_000
        long_ago = now_ms() - 120_000
        # seqs 1-4 were sent two minutes ago without an ack; seq 5 was sent just now.
        await outbox.mark_published([(seq, far) for seq in (1, 2, 3, 4)], long_ago)
        await outbox.mark_published([(5, far)], now_ms())
        assert await outbox.due(100) == []
        close = await outbox.submit("shift_close", shift_close(7, 1, 5, 4, 48_400))
        # The shift's stale rows and the close itself; not seq 4 (shift 8), not seq 5 (in flight).
        assert [row.seq for row in await outbox.due(100)] == [1, 2, 3, close.seq]
        await outbox.make_due()
        assert [row.seq for row in await outbox.due(100)] == [1, 2, 3, 4, 5, close.seq]


async def test_a_document_over_the_size_limit_is_refused_before_it_gets_a_seq(
    tmp_path: Path,
) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        body = receipt()
        body["lines"] = [dict(body["lines"][0], line_no=n, name="x" * 1000) for n in range(1, 1200)]
        with pytest.raises(TooLargeError) as info:
            await outbox.submit("receipt", body)
        assert info.value.code == "too_large"
        assert (await outbox.submit("receipt", receipt())).seq == 1
        assert outbox.counts.pending == 1


async def test_a_cancelled_submit_or_ack_leaves_counts_and_seqs_true(tmp_path: Path) -> None:
    """A POS request that times out cancels its await; the commit must still complete
    with the counters, or the next submit would reuse a seq."""
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        for delay_steps in range(6):
            task = asyncio.create_task(outbox.submit("receipt", receipt()))
            for _ in range(delay_steps):
                await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        ack = AckBody(register_id="r-1", accepted=[SeqRange(first=1, last=3)])
        task = asyncio.create_task(outbox.apply_ack(ack))
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        following = await outbox.submit("receipt", receipt())
        # The cancelled ack still commits, maybe after `following`: wait for every write
        # queued so far (the lock is FIFO) before reading the table from outside.
        async with store.write_lock:
            pass
        stored = table_counts(tmp_path / "a.db")
        counts = outbox.counts
        assert following.seq == counts.last_seq == sum(stored.values())
        assert counts.pending == stored.get("pending", 0)
        assert counts.acknowledged == stored.get("acknowledged", 0)


async def test_acks_that_arrive_together_are_applied_together_and_each_counted(
    tmp_path: Path,
) -> None:
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        for _ in range(30):
            await outbox.submit("receipt", receipt())
        acks = [
            AckBody(register_id="r-1", accepted=[SeqRange(first=n, last=n + 9)])
            for n in (1, 11, 21)
        ] + [AckBody(register_id="r-1", accepted=[SeqRange(first=1, last=10)])]  # a repeat
        results = await asyncio.gather(*(outbox.apply_ack(ack) for ack in acks))
        assert sorted(results) == [(0, 0), (10, 0), (10, 0), (10, 0)]
        assert (outbox.counts.pending, outbox.counts.acknowledged) == (0, 30)
    assert table_counts(tmp_path / "a.db") == {"acknowledged": 30}


async def test_acks_and_submits_that_meet_share_one_transaction(tmp_path: Path) -> None:
    """Under load a register writes one transaction per trip to its SQLite thread, the
    submits and central's acks waiting together in it, each caller with its own result."""
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        for _ in range(4):
            await outbox.submit("receipt", receipt())
        statements: list[str] = []
        await store.in_thread(lambda conn: conn.set_trace_callback(statements.append))
        ack = AckBody(
            register_id="r-1",
            accepted=[SeqRange(first=1, last=3)],
            rejected=[Rejection(seq=4, code="refused", field="body", reason="no")],
        )
        submitted, counted = await asyncio.gather(
            outbox.submit("receipt", receipt()), outbox.apply_ack(ack)
        )
        await store.in_thread(lambda conn: conn.set_trace_callback(None))
        assert (submitted.seq, counted) == (5, (3, 1))
        assert [s.split()[0] for s in statements].count("BEGIN") == 1
        assert any("INSERT INTO outbox" in s for s in statements)
        assert any("state = 'acknowledged'" in s for s in statements)
        assert outbox.counts == Counts(last_seq=5, pending=1, acknowledged=3, rejected=1)
    assert table_counts(tmp_path / "a.db") == {"pending": 1, "acknowledged": 3, "rejected": 1}


async def test_a_failed_transaction_fails_its_submits_and_acks_alike(tmp_path: Path) -> None:
    """Nothing of it is applied, every caller hears, counts stay true, and the next
    transaction works."""
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        await outbox.submit("receipt", receipt())
        # A real failure inside the transaction: SQLite aborts the ack's UPDATE.
        await store.in_thread(
            lambda conn: conn.execute(
                "CREATE TEMP TRIGGER no_acks BEFORE UPDATE OF state ON outbox "
                "WHEN NEW.state = 'acknowledged' BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
            )
        )
        ack = AckBody(register_id="r-1", accepted=[SeqRange(first=1, last=1)])
        results = await asyncio.gather(
            outbox.submit("receipt", receipt()), outbox.apply_ack(ack), return_exceptions=True
        )
        assert [type(r) for r in results] == [sqlite3.IntegrityError] * 2
        assert outbox.counts == Counts(last_seq=1, pending=1, acknowledged=0, rejected=0)
        await store.in_thread(lambda conn: conn.execute("DROP TRIGGER no_acks"))
        assert (await outbox.submit("receipt", receipt())).seq == 2
        assert await outbox.apply_ack(ack) == (1, 0)
        assert outbox.counts == Counts(last_seq=2, pending=1, acknowledged=1, rejected=0)
    assert table_counts(tmp_path / "a.db") == {"pending": 1, "acknowledged": 1}


async def test_the_sender_never_reads_a_row_that_a_rollback_takes_back(tmp_path: Path) -> None:
    """``submit_with`` keeps its transaction open over several steps; a due query in
    between must wait, or it would publish a seq that the rollback then frees for
    another document (a conflict at central)."""
    async with Store(tmp_path / "a.db") as store:
        outbox = await open_outbox(store)
        inserted, release = asyncio.Event(), asyncio.Event()

        async def body(db: object) -> dict[str, object]:
            return receipt()

        async def write(db: object, submitted: object) -> None:
            inserted.set()  # the row is in, not committed
            await release.wait()
            raise RuntimeError("the caller's own write failed")

        edit = asyncio.create_task(outbox.submit_with("receipt", body, write))
        await inserted.wait()
        due = asyncio.create_task(outbox.due(100))
        await asyncio.sleep(0.05)
        assert not due.done()  # it waits for the transaction to end
        release.set()
        with pytest.raises(RuntimeError):
            await edit
        assert await due == []
        replacement = await outbox.submit("receipt", receipt(500))
        assert replacement.seq == 1
        assert [row.seq for row in await outbox.due(100)] == [1]
        assert outbox.counts.pending == 1
    assert table_counts(tmp_path / "a.db") == {"pending": 1}
