"""Reconciliation against real PostgreSQL and RabbitMQ: seq holes are asked for (with
backoff) and closed, and Z-reports are checked against the documents received."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from central.conftest import Enroll, new_id
from central.tills import Till, documents_rows_read, pack, state_settled, store_seqs
from tillsync_central.reconcile import MAX_GAPS_PER_REGISTER, Difference, PassResult, reconcile_pass
from tillsync_central.runner import IngestService
from tillsync_central.settings import CentralSettings
from tillsync_protocol import ResendRequest, decode_control, topology
from tillsync_protocol.control import ResendRequestBody


class RecordingTill(Till):
    """A till that also keeps the resend requests central sends it."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.requests: list[ResendRequestBody] = []

    async def _on_ack(self, message: AbstractIncomingMessage) -> None:
        control = decode_control(message.body)
        if isinstance(control, ResendRequest):
            self.requests.append(control.body)
            self._changed.set()
        else:
            await super()._on_ack(message)

    async def wait_requests(self, n: int, timeout: float = 10.0) -> list[ResendRequestBody]:
        async with asyncio.timeout(timeout):
            while len(self.requests) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.requests


@pytest.fixture
async def exchange(settings: CentralSettings, declared: None) -> AsyncIterator[AbstractExchange]:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=15)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        yield await channel.get_exchange(topology.REGISTERS_EXCHANGE, ensure=False)


def _open(shift_no: int = 1) -> dict[str, Any]:
    return {"shift_no": shift_no, "employee_id": "emp-1", "currency": "CZK", "opening_float": 0}


def _receipt(n: int, total: int, method: str = "cash") -> dict[str, Any]:
    return {
        "receipt_no": f"R-{n}",
        "shift_no": 1,
        "employee_id": "emp-1",
        "currency": "CZK",
        "lines": [
            {
                "line_no": 1,
                "item_id": "bread",
                "name": "Bread",
                "qty_milli": 1000,
                "unit_price": total,
                "tax_rate_id": "cz-12",
                "tax_rate_bp": 1200,
                "total": total,
            }
        ],
        "payments": [{"method_id": method, "amount": total}],
        "total": total,
    }


def _z_report(
    first: int, last: int, payments: list[dict[str, Any]], **fields: int
) -> dict[str, Any]:
    gross = sum(p["amount"] for p in payments)
    report = {
        "shift_no": 1,
        "z_number": 1,
        "employee_id": "emp-1",
        "currency": "CZK",
        "first_seq": first,
        "last_seq": last,
        "receipt_count": sum(p["count"] for p in payments),
        "refund_count": 0,
        "void_count": 0,
        "gross_sales": gross,
        "refunds_total": 0,
        "net_total": gross,
        "payments": payments,
        "taxes": [],
        "cash_expected": gross,
        "cash_counted": gross,
    }
    report.update(fields)
    return report


async def _pass(pool: asyncpg.Pool, exchange: AbstractExchange | None, grace: float) -> Any:
    await state_settled(pool)  # as the reconciler's next pass would see it
    async with pool.acquire() as conn:
        return await reconcile_pass(conn, exchange, hole_grace_s=grace, request_cap_s=3600)


async def test_holes_are_asked_for_after_the_grace_with_backoff_and_closed_when_filled(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool, exchange: AbstractExchange
) -> None:
    till = RecordingTill(await enroll())
    async with till:
        docs = {seq: till.document(seq) for seq in range(1, 11)}
        first = [docs[seq] for seq in (1, 2, 3, 6, 7, 9, 10)]
        await till.publish_documents(first)
        await till.wait_for(doc["seq"] for doc in first)

        # Within the grace: recorded, not asked for.
        result = await _pass(pool, exchange, grace=0.5)
        assert result.locked
        assert result.holes_open == 2
        assert result.requests == []
        state = await pool.fetchrow(
            "SELECT contiguous_seq, last_seq FROM register_state WHERE register_id = $1",
            till.register_id,
        )
        assert (state["contiguous_seq"], state["last_seq"]) == (3, 10)

        await asyncio.sleep(0.6)
        result = await _pass(pool, exchange, grace=0.5)
        assert [(r.from_seq, r.to_seq) for r in result.requests] == [(4, 5), (8, 8)]
        received = await till.wait_requests(2)
        assert sorted((r.register_id, r.from_seq, r.to_seq) for r in received) == [
            (till.register_id, 4, 5),
            (till.register_id, 8, 8),
        ]
        # Backoff: the next request waits twice the grace.
        assert (await _pass(pool, exchange, grace=0.5)).requests == []
        await asyncio.sleep(1.1)
        again = await _pass(pool, exchange, grace=0.5)
        assert len(again.requests) == 2
        await till.wait_requests(4)

        # The register resends: both holes close and the cursor reaches the end.
        rest = [docs[seq] for seq in (4, 5, 8)]
        await till.publish_documents(rest)
        await till.wait_for(doc["seq"] for doc in rest)
        result = await _pass(pool, exchange, grace=0.5)
        assert (result.holes_open, result.holes_resolved, result.requests) == (0, 2, [])
    holes = await pool.fetch(
        "SELECT from_seq, to_seq, requests, resolved_at IS NOT NULL AS resolved"
        " FROM seq_holes WHERE register_id = $1 ORDER BY from_seq",
        till.register_id,
    )
    assert [tuple(h) for h in holes] == [(4, 5, 2, True), (8, 8, 2, True)]
    assert (
        await pool.fetchval(
            "SELECT contiguous_seq FROM register_state WHERE register_id = $1", till.register_id
        )
        == 10
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM documents WHERE register_id = $1", till.register_id
        )
        == 10
    )


async def test_a_hole_central_refused_itself_is_kept_but_not_asked_for(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool, exchange: AbstractExchange
) -> None:
    """Seq 3 is refused by ingest (dead-lettered, the rejection sent back): the register
    holds it as rejected and would resend nothing, so its hole is kept but not asked for;
    seq 5, never received, is."""
    till = RecordingTill(await enroll())
    async with till:
        broken = till.document(3)
        broken["body"]["total"] = "twelve"  # wrong_type: refused, attributable to seq 3
        await till.publish_documents([till.document(s) for s in (1, 2)])
        await till.publish(pack(broken), message_id=broken["doc_id"])
        await till.publish_documents([till.document(s) for s in (4, 6)])
        await till.wait_for([1, 2, 3, 4, 6])
        assert till.acks.rejected[3].code == "wrong_type"

        result = await _pass(pool, exchange, grace=0)
        assert result.holes_open == 2
        assert [(r.from_seq, r.to_seq) for r in result.requests] == [(5, 5)]
        received = await till.wait_requests(1)
        assert [(r.from_seq, r.to_seq) for r in received] == [(5, 5)]
        # Nor later: the backoff has nothing to do with it.
        await asyncio.sleep(0.1)
        assert [
            (r.from_seq, r.to_seq) for r in (await _pass(pool, exchange, grace=0)).requests
        ] == [(5, 5)]
    holes = await pool.fetch(
        "SELECT from_seq, requests, resolved_at IS NULL AS open FROM seq_holes"
        " WHERE register_id = $1 ORDER BY from_seq",
        till.register_id,
    )
    assert [tuple(h) for h in holes] == [(3, 0, True), (5, 2, True)]
    letters = await pool.fetch(
        "SELECT source, seq, code FROM dead_letters WHERE register_id = $1", till.register_id
    )
    assert [tuple(r) for r in letters] == [("ingest", 3, "wrong_type")]


async def test_a_pass_moves_last_seq_with_contiguous_seq_when_the_state_lags(
    enroll: Enroll, pool: asyncpg.Pool
) -> None:
    """``register_state`` is written after the acks and may lag the documents; a hole the
    pass finds past the row's ``last_seq`` moves both, and the pass commits (it failed on
    the table's check ``last_seq >= contiguous_seq`` and kept failing while ingest ran)."""
    enrollment = await enroll()
    register_id = enrollment.register_id
    await store_seqs(pool, register_id, enrollment.center_id, range(1, 9))
    await store_seqs(pool, register_id, enrollment.center_id, range(10, 13))
    # As the state writer left it, behind the documents (it writes after the acks).
    await pool.execute(
        "UPDATE register_state SET contiguous_seq = 1, last_seq = 4 WHERE register_id = $1",
        register_id,
    )
    async with pool.acquire() as conn:
        result = await reconcile_pass(conn, None, hole_grace_s=60, request_cap_s=3600)
    assert result.locked
    state = await pool.fetchrow(
        "SELECT contiguous_seq, last_seq FROM register_state WHERE register_id = $1", register_id
    )
    assert (state["contiguous_seq"], state["last_seq"]) == (8, 8)
    holes = await pool.fetch(
        "SELECT from_seq, to_seq FROM seq_holes WHERE register_id = $1", register_id
    )
    assert [tuple(h) for h in holes] == [(9, 9)]


async def _pass_counting_reads(pool: asyncpg.Pool, register_id: str) -> tuple[PassResult, int]:
    """A pass (no requests sent), and the ``documents`` rows read for ``register_id``: the
    statements the pass ran with that register's id, run again with the same arguments
    under ``EXPLAIN ANALYZE`` (they only read)."""
    ran: list[tuple[str, tuple[Any, ...]]] = []

    def record(query: asyncpg.connection.LoggedQuery) -> None:
        if query.args and query.args[0] == register_id and "FROM documents" in query.query:
            ran.append((query.query, query.args))

    async with pool.acquire() as conn:
        conn.add_query_logger(record)
        try:
            result = await reconcile_pass(conn, None, hole_grace_s=60, request_cap_s=3600)
        finally:
            await asyncio.sleep(0)  # loggers are called soon after each query
            conn.remove_query_logger(record)
        assert ran, "the pass searched nothing for this register"
        read = 0
        for query, args in ran:
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", *args)
            read += documents_rows_read(json.loads(plan) if isinstance(plan, str) else plan)
    return result, read


async def _holes_and_state(pool: asyncpg.Pool, register_id: str) -> tuple[list[Any], Any]:
    holes = await pool.fetch(
        "SELECT from_seq, to_seq, resolved_at IS NULL AS open FROM seq_holes"
        " WHERE register_id = $1 ORDER BY from_seq, id",
        register_id,
    )
    state = await pool.fetchrow(
        "SELECT contiguous_seq, last_seq, gaps_checked_seq FROM register_state"
        " WHERE register_id = $1",
        register_id,
    )
    return [tuple(h) for h in holes], tuple(state)


async def test_a_pass_reads_the_open_holes_and_new_documents_not_the_history_after_a_hole(
    enroll: Enroll, pool: asyncpg.Pool
) -> None:
    """Behind a hole that does not fill (a document central refused, say), contiguous_seq
    stays put; a pass searches that hole again and what was stored since the last pass,
    not every document after the hole: that grew with the register's history, each pass."""
    enrollment = await enroll()
    register_id, center_id = enrollment.register_id, enrollment.center_id

    async def stored(seqs: range) -> None:
        await store_seqs(pool, register_id, center_id, seqs)
        # As ingest's state writer moves it on (see test_a_pass_moves_last_seq_…).
        await pool.execute(
            "UPDATE register_state SET last_seq = greatest(last_seq, $2) WHERE register_id = $1",
            register_id,
            seqs[-1],
        )

    await stored(range(1, 2))
    await stored(range(3, 3001))
    await pool.execute("ANALYZE documents")  # as autovacuum keeps it: plans use the index
    result, read = await _pass_counting_reads(pool, register_id)
    assert read >= 2998  # the first search reads all of it, once
    assert await _holes_and_state(pool, register_id) == ([(2, 2, True)], (1, 3000, 3000))

    # Ten more with a hole at 3005: the pass reads those, not the 3,000 before them.
    await stored(range(3001, 3005))
    await stored(range(3006, 3011))
    result, read = await _pass_counting_reads(pool, register_id)
    assert read <= 10
    assert result.holes_open == 2
    assert await _holes_and_state(pool, register_id) == (
        [(2, 2, True), (3005, 3005, True)],
        (1, 3010, 3010),
    )

    # The first hole fills: resolved, and contiguous_seq stops before the second.
    await stored(range(2, 3))
    result, read = await _pass_counting_reads(pool, register_id)
    assert read <= 3
    assert (result.holes_open, result.holes_resolved) == (1, 1)
    assert await _holes_and_state(pool, register_id) == (
        [(2, 2, False), (3005, 3005, True)],
        (3004, 3010, 3010),
    )

    # The second one too: nothing open, every seq stored.
    await stored(range(3005, 3006))
    result, _ = await _pass_counting_reads(pool, register_id)
    assert (result.holes_open, result.holes_resolved) == (0, 1)
    assert await _holes_and_state(pool, register_id) == (
        [(2, 2, False), (3005, 3005, False)],
        (3010, 3010, 3010),
    )


async def test_a_pass_keeps_the_first_holes_of_many_and_finds_the_rest_as_they_fill(
    enroll: Enroll, pool: asyncpg.Pool
) -> None:
    """A register missing every other seq: at most MAX_GAPS_PER_REGISTER of its holes are
    open at a time, the first ones; the later ones are found once earlier ones fill."""
    enrollment = await enroll()
    register_id, center_id = enrollment.register_id, enrollment.center_id
    missing = list(range(2, 2 * (MAX_GAPS_PER_REGISTER + 50) + 1, 2))  # 150 of them
    last = missing[-1] + 1
    await store_seqs(pool, register_id, center_id, range(1, last + 1, 2))
    await pool.execute(
        "UPDATE register_state SET last_seq = $2 WHERE register_id = $1", register_id, last
    )
    kept = missing[:MAX_GAPS_PER_REGISTER]
    for _ in range(2):  # and again: the rest waits
        assert (await _pass(pool, None, grace=60)).holes_open == MAX_GAPS_PER_REGISTER
        holes, state = await _holes_and_state(pool, register_id)
        assert holes == [(seq, seq, True) for seq in kept]
        assert state == (1, last, kept[-1])

    # The first 60 fill: those are resolved, and the last 50 found.
    await store_seqs(pool, register_id, center_id, missing[:60])
    result = await _pass(pool, None, grace=60)
    assert (result.holes_open, result.holes_resolved) == (90, 60)
    holes, state = await _holes_and_state(pool, register_id)
    assert [h[0] for h in holes if h[2]] == missing[60:]
    assert [h[0] for h in holes if not h[2]] == missing[:60]
    assert state == (missing[60] - 1, last, last)

    # All of them: nothing open, contiguous_seq at the end.
    await store_seqs(pool, register_id, center_id, missing[60:])
    result = await _pass(pool, None, grace=60)
    assert (result.holes_open, result.holes_resolved) == (0, 90)
    assert (await _holes_and_state(pool, register_id))[1] == (last, last, last)


async def test_a_hole_filled_from_its_start_leaves_a_new_hole_for_the_rest(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    till = RecordingTill(await enroll())
    async with till:
        docs = {seq: till.document(seq) for seq in range(1, 7)}
        await till.publish_documents([docs[1], docs[6]])
        await till.wait_for([1, 6])
        assert (await _pass(pool, None, grace=0)).holes_open == 1
        await till.publish_documents([docs[2], docs[3]])
        await till.wait_for([2, 3])
        result = await _pass(pool, None, grace=0)
        assert (result.holes_open, result.holes_resolved) == (1, 1)
    holes = await pool.fetch(
        "SELECT from_seq, to_seq, resolved_at IS NULL AS open FROM seq_holes"
        " WHERE register_id = $1 ORDER BY id",
        till.register_id,
    )
    assert [tuple(h) for h in holes] == [(2, 5, False), (4, 5, True)]


async def test_only_one_pass_runs_at_a_time(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    async with pool.acquire() as holder, holder.transaction():
        assert await holder.fetchval("SELECT pg_try_advisory_xact_lock(29801, 24256)")
        result = await _pass(pool, None, grace=0)
        assert not result.locked
    assert (await _pass(pool, None, grace=0)).locked


async def test_z_reports_are_checked_once_their_range_is_complete(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    center = new_id("c")
    good, bad = RecordingTill(await enroll(center)), RecordingTill(await enroll(center))
    sales = [(2, 1500, "cash"), (3, 2500, "card"), (4, 1000, "card")]
    for till in (good, bad):
        async with till:
            docs = [till.document(1, "shift_open", _open())]
            docs += [till.document(seq, "receipt", _receipt(seq, t, m)) for seq, t, m in sales]
            payments = [
                {"method_id": "card", "count": 2, "amount": 3500},
                {"method_id": "cash", "count": 1, "amount": 1500},
            ]
            if till is bad:
                # The register claims one more card sale than central received.
                payments[0] = {"method_id": "card", "count": 3, "amount": 4100}
            docs.append(till.document(5, "shift_close", _z_report(1, 5, payments)))
            # Receipt 3 is late: the good register's shift waits for it.
            early = [d for d in docs if d["seq"] != 3]
            await till.publish_documents(early)
            await till.wait_for(d["seq"] for d in early)
            if till is good:
                result = await _pass(pool, None, grace=60)
                assert (result.shifts_waiting, result.shifts_ok) == (1, 0)
                # Waiting is not a verdict: the shift stays among those to check.
                assert not await pool.fetchval(
                    "SELECT z_checked FROM shifts WHERE register_id = $1", till.register_id
                )
            await till.publish_documents([d for d in docs if d["seq"] == 3])
            await till.wait_for([3])

    result = await _pass(pool, None, grace=60)
    assert (result.shifts_ok, result.shifts_mismatch, result.shifts_waiting) == (1, 1, 0)
    rows = {
        r["register_id"]: r
        for r in await pool.fetch(
            "SELECT register_id, status, differences FROM shift_reconciliations"
        )
    }
    assert rows[good.register_id]["status"] == "ok"
    assert rows[good.register_id]["differences"] == []
    assert rows[bad.register_id]["status"] == "mismatch"
    # Stored as a JSON array, not as a string holding one.
    assert (
        await pool.fetchval(
            "SELECT jsonb_typeof(differences) FROM shift_reconciliations WHERE register_id = $1",
            bad.register_id,
        )
        == "array"
    )
    differences = [Difference(**d) for d in rows[bad.register_id]["differences"]]
    assert differences == [
        Difference("gross_sales", 5600, 5000),
        Difference("payments[card].amount", 4100, 3500),
        Difference("payments[card].count", 3, 2),
        Difference("receipt_count", 4, 3),
    ]
    # Final: out of the unchecked index, and another pass neither re-checks nor changes them.
    checked = await pool.fetch(
        "SELECT z_checked FROM shifts WHERE register_id = ANY($1::text[])",
        [good.register_id, bad.register_id],
    )
    assert [r["z_checked"] for r in checked] == [True, True]
    result = await _pass(pool, None, grace=60)
    assert (result.shifts_ok, result.shifts_mismatch, result.shifts_waiting) == (0, 0, 0)
