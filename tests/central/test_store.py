"""One ingest batch applied by :func:`tillsync_central.store.store` (real PostgreSQL):
the documents, their receipts rows and their stock lines are written by one statement,
for the documents that statement stored and for no other (a duplicate, a conflict, a
key repeated within the batch, a refused delivery)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from central.conftest import Enroll
from central.tills import canonical, raw_document, sale_body
from tillsync_central.db import create_pool
from tillsync_central.intake import Delivery, inspect
from tillsync_central.provisioning import Enrollment
from tillsync_central.settings import CentralSettings
from tillsync_central.store import store
from tillsync_protocol import topology


class _Register:
    """An enrolled register's deliveries, as ingest receives them (no broker in between)."""

    def __init__(self, enrollment: Enrollment) -> None:
        self.center_id = enrollment.center_id
        self.register_id = enrollment.register_id
        self.broker_user = enrollment.broker_user

    def delivery(self, seq: int, doc_type: str, body: dict[str, Any]) -> Delivery:
        raw = raw_document(self.center_id, self.register_id, seq, doc_type, body)
        return Delivery(
            body=canonical(raw),
            routing_key=topology.document_key(self.center_id, self.register_id, doc_type),
            user_id=self.broker_user,
            message_id=raw["doc_id"],
            headers={},
        )


async def _stock_pending(pool: asyncpg.Pool) -> dict[tuple[str, str], int]:
    rows = await pool.fetch(
        "SELECT center_id, item_id, sum(qty_milli)::bigint AS qty FROM stock_pending GROUP BY 1, 2"
    )
    return {(r["center_id"], r["item_id"]): r["qty"] for r in rows}


async def test_receipts_rows_and_stock_lines_come_only_with_the_documents_stored(
    enroll: Enroll, pool: asyncpg.Pool
) -> None:
    till = _Register(await enroll())
    center = till.center_id
    first = till.delivery(1, "receipt", sale_body(1, [("bread", 2_000)]))
    before = await store(pool, [inspect(first)])
    assert (before.stored, before.stock_lines) == (1, 1)

    # Every kind in one batch: a resend of seq 1 (a duplicate), seq 1 again with other
    # content (a conflict), a new receipt of two lines, a refund, a cash movement (no
    # receipt row, no stock), seq 5 twice with different content (the second one is
    # judged in a later round, against the first), and a delivery of a stranger.
    stranger = Delivery(first.body, first.routing_key, "nobody", None, {})
    cash = {
        "shift_no": 1,
        "direction": "in",
        "amount": 1_000,
        "currency": "CZK",
        "employee_id": "emp-1",
        "reason": "float",
    }
    batch = [
        first,
        till.delivery(1, "receipt", sale_body(1, [("bread", 9_000), ("milk", 1)])),
        till.delivery(2, "receipt", sale_body(2, [("bread", 1_000), ("milk", 3_000)])),
        till.delivery(3, "refund", {**sale_body(3, [("milk", 500)]), "reason": "sour"}),
        till.delivery(4, "cash_movement", cash),
        till.delivery(5, "receipt", sale_body(5, [("milk", 1_000)])),
        till.delivery(5, "receipt", sale_body(5, [("milk", 7_000), ("tea", 1)])),
        stranger,
    ]
    result = await store(pool, [inspect(d) for d in batch])

    assert (result.stored, result.duplicates, result.conflicts, result.refused) == (4, 1, 2, 1)
    assert result.accepted[till.register_id] == {1, 2, 3, 4, 5}
    assert sorted(r.seq for r in result.rejected[till.register_id]) == [1, 5]
    assert result.stock_lines == 4  # 2 (seq 2) + 1 (seq 3) + 1 (seq 5): stored ones only
    receipts = await pool.fetch(
        "SELECT seq, kind, total, line_count FROM receipts WHERE register_id = $1 ORDER BY seq",
        till.register_id,
    )
    assert [tuple(r) for r in receipts] == [
        (1, "receipt", 100, 1),  # the first content kept
        (2, "receipt", 200, 2),
        (3, "refund", 100, 1),
        (5, "receipt", 100, 1),  # the first of the two in the batch
    ]
    stored = await pool.fetchval(
        "SELECT count(*) FROM documents WHERE register_id = $1", till.register_id
    )
    assert stored == 5 == len(receipts) + 1  # and the cash movement
    # bread: -2 (seq 1) -1 (seq 2); milk: -3 (seq 2) +0.5 (refund) -1 (seq 5)
    assert await _stock_pending(pool) == {(center, "bread"): -3_000, (center, "milk"): -3_500}


@contextlib.asynccontextmanager
async def _logged(settings: CentralSettings) -> AsyncIterator[tuple[asyncpg.Pool, list[str]]]:
    """central's pool whose one connection logs the statements it runs."""
    settings = settings.model_copy(update={"db_pool_min_size": 1, "db_pool_max_size": 1})
    sent: list[str] = []
    pool = await create_pool(settings)
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda record: sent.append(record.query.split()[0]))
        yield pool, sent
    finally:
        await pool.close()


async def test_a_batch_of_sales_only_is_one_statement_without_begin_or_commit(
    enroll: Enroll, settings: CentralSettings
) -> None:
    till = _Register(await enroll())
    center = till.center_id
    async with _logged(settings) as (pool, sent):
        first = till.delivery(1, "receipt", sale_body(1, [("bread", 1_000)]))
        await store(
            pool, [inspect(first), inspect(till.delivery(2, "receipt", sale_body(2, [("jam", 1)])))]
        )
        batch = [
            first,  # a duplicate
            till.delivery(2, "receipt", sale_body(2, [("bread", 5_000)])),  # a conflict
            till.delivery(3, "refund", {**sale_body(3, [("bread", 250)]), "reason": "stale"}),
        ]
        sent.clear()
        result = await store(pool, [inspect(d) for d in batch], advance=False)  # as ingest
        await asyncio.sleep(0.05)  # asyncpg calls query loggers soon after, not at once
        # The documents statement (which reads the registers too), then what it did not
        # store: the stored hashes of its keys, and the conflict's row. No BEGIN, no COMMIT.
        assert sent == ["WITH", "SELECT", "INSERT"]
        assert (result.stored, result.duplicates, result.conflicts) == (1, 1, 1)
        assert await pool.fetchval("SELECT count(*) FROM conflicts") == 1
        assert await _stock_pending(pool) == {(center, "bread"): -750, (center, "jam"): -1}

        sent.clear()  # a shift close needs a transaction: it writes shifts too
        await store(pool, [inspect(till.delivery(4, "shift_open", _shift_open()))], advance=False)
        await asyncio.sleep(0.05)
        assert (sent[:2], sent[-1]) == (["SELECT", "BEGIN;"], "COMMIT;")  # registers read first

        # A sale of a revoked register among them: the checked statement stores nothing,
        # and the transaction stores the rest and refuses it.
        revoked = _Register(await enroll(center_id=center))
        await pool.execute(
            "UPDATE registers SET revoked_at = now() WHERE register_id = $1", revoked.register_id
        )
        sent.clear()
        batch = [
            till.delivery(5, "receipt", sale_body(5, [("jam", 2_000)])),
            revoked.delivery(1, "receipt", sale_body(1, [("jam", 7_000)])),
        ]
        result = await store(pool, [inspect(d) for d in batch], advance=False)
        await asyncio.sleep(0.05)
        assert (sent[:2], sent[-1]) == (["WITH", "BEGIN;"], "COMMIT;")
        assert (result.stored, result.refused) == (1, 1)
        assert result.accepted == {till.register_id: {5}}
        letters = await pool.fetch(
            "SELECT code, seq FROM dead_letters WHERE register_id = $1", revoked.register_id
        )
        assert [tuple(r) for r in letters] == [("unknown_register", 1)]
        documents = await pool.fetch(
            "SELECT register_id, seq FROM documents WHERE seq = 5 OR register_id = $1",
            revoked.register_id,
        )
        assert [tuple(r) for r in documents] == [(till.register_id, 5)]
        assert await _stock_pending(pool) == {(center, "bread"): -750, (center, "jam"): -2_001}


def _shift_open() -> dict[str, Any]:
    return {"shift_no": 2, "employee_id": "emp-1", "currency": "CZK", "opening_float": 5_000}


async def test_lines_that_cancel_out_within_a_batch_write_no_stock_row(
    enroll: Enroll, pool: asyncpg.Pool
) -> None:
    till = _Register(await enroll())
    center = till.center_id
    batch = [
        till.delivery(1, "receipt", sale_body(1, [("tea", 1_000), ("jam", 2_000)])),
        till.delivery(2, "refund", {**sale_body(2, [("tea", 1_000)]), "reason": "spare"}),
    ]
    result = await store(pool, [inspect(d) for d in batch])
    assert (result.stored, result.stock_lines) == (2, 3)
    assert await _stock_pending(pool) == {(center, "jam"): -2_000}
    assert await pool.fetchval("SELECT count(*) FROM stock_pending") == 1


def _shift_close(shift_no: int, seq: int) -> dict[str, Any]:
    """An empty shift's Z-report (its open at ``seq - 1``)."""
    return {
        "shift_no": shift_no,
        "z_number": shift_no,
        "employee_id": "emp-1",
        "currency": "CZK",
        "first_seq": seq - 1,
        "last_seq": seq,
        "receipt_count": 0,
        "refund_count": 0,
        "void_count": 0,
        "gross_sales": 0,
        "refunds_total": 0,
        "net_total": 0,
        "payments": [],
        "taxes": [],
        "cash_expected": 0,
        "cash_counted": 0,
    }


async def test_two_workers_writing_the_same_shifts_crosswise_do_not_deadlock(
    enroll: Enroll, pool: asyncpg.Pool
) -> None:
    """Two registers' shifts split across two concurrent batches, each the other's mirror
    (A's open with B's close, and B's open with A's close), as two ingest workers get
    them when consecutive messages of a register go to different workers. Without one
    lock order for the shift rows, each batch's first statement locks a row the other's
    second statement needs, and PostgreSQL kills one of them as a deadlock."""
    a, b = _Register(await enroll()), _Register(await enroll())
    shifts = 10
    for shift_no in range(1, shifts + 1):
        seq = 2 * shift_no
        opens = {r: r.delivery(seq - 1, "shift_open", _open(shift_no)) for r in (a, b)}
        closes = {r: r.delivery(seq, "shift_close", _shift_close(shift_no, seq)) for r in (a, b)}
        results = await asyncio.gather(
            store(pool, [inspect(opens[a]), inspect(closes[b])], advance=False),
            store(pool, [inspect(opens[b]), inspect(closes[a])], advance=False),
        )
        assert [r.stored for r in results] == [2, 2]
    rows = await pool.fetch(
        "SELECT register_id, count(*) AS n, count(opened_seq) AS opened,"
        " count(closed_seq) AS closed FROM shifts GROUP BY register_id"
    )
    assert sorted((r["n"], r["opened"], r["closed"]) for r in rows) == [(shifts,) * 3] * 2


def _open(shift_no: int) -> dict[str, Any]:
    return {**_shift_open(), "shift_no": shift_no}
