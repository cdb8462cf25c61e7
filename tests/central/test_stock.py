"""Stock moved by what registers sell (real RabbitMQ and PostgreSQL, the ingest workers,
the reconciler's pass): receipts take out, refunds and voids put back, each once,
whatever the order the documents arrive in, and each pass writes every changed stock row
once as a catalog change."""

from __future__ import annotations

from typing import Any

import asyncpg

from central.conftest import Enroll, new_id
from central.tills import Till, sale_body, state_settled, until
from tillsync_central.catalog import CatalogEditor
from tillsync_central.reconcile import reconcile_pass
from tillsync_central.runner import IngestService


def _refund(n: int, lines: list[tuple[str, int]]) -> dict[str, Any]:
    return {**sale_body(n, lines), "reason": "returned"}


def _void(receipt: dict[str, Any]) -> dict[str, Any]:
    return {
        "voided_doc_id": receipt["doc_id"],
        "voided_receipt_no": receipt["body"]["receipt_no"],
        "shift_no": 1,
        "employee_id": "emp-1",
        "reason": "wrong item",
    }


async def _fold(pool: asyncpg.Pool) -> int:
    async with pool.acquire() as conn:
        result = await reconcile_pass(conn, None, hole_grace_s=60, request_cap_s=3600)
    assert result.locked
    return int(result.stock_rows)


async def _stock(pool: asyncpg.Pool, center: str) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT key, state FROM catalog_entities"
        " WHERE scope = $1 AND entity = 'stock_levels' AND NOT deleted",
        center,
    )
    return {r["key"]: r["state"]["qty_milli"] for r in rows}


async def test_sales_refunds_and_voids_move_stock_once_in_any_order(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    center = new_id("c")
    a, b = Till(await enroll(center)), Till(await enroll(center))
    await CatalogEditor(pool).upsert(
        center, "stock_levels", "bread", {"qty_milli": 50_000, "min_qty_milli": 5_000}
    )
    first = a.document(1, "receipt", sale_body(1, [("bread", 2_000), ("milk", 1_500)]))
    late = a.document(3, "receipt", sale_body(3, [("milk", 500)]))
    async with a, b:
        sent = await a.publish_documents(
            [
                first,
                a.document(2, "void", _void(first)),  # after its receipt
                a.document(4, "void", _void(late)),  # before its receipt
                a.document(5, "void", _void(first)),  # the same receipt again
            ]
        )
        await b.publish_documents(
            [
                b.document(1, "receipt", sale_body(1, [("bread", 3_000)])),
                b.document(2, "refund", _refund(2, [("bread", 1_000)])),
            ]
        )
        await a.wait_for([1, 2, 4, 5])
        await b.wait_for([1, 2])
        # Folded: the void of the receipt not yet here waits for it.
        await state_settled(pool)
        # bread: 50 - 2 (a1) + 2 (void a2) - 3 (b1) + 1 (refund b2) = 48; milk: -1.5 + 1.5
        # moved nothing in sum, so no row is written for it.
        assert await _fold(pool) == 1
        assert await _stock(pool, center) == {"bread": 48_000}
        assert await pool.fetchval("SELECT count(*) FROM stock_voids_waiting") == 1

        await a.publish_documents([late])
        await a.publish(sent[0], doc_type="receipt")  # a resend of receipt 1: a duplicate
        await a.wait_for([3])
        await until(lambda: _duplicates(ingest, 1), timeout=30)
        await state_settled(pool)
        # The late receipt and its earlier void cancel out: nothing to write.
        assert await _fold(pool) == 0
        assert await _stock(pool, center) == {"bread": 48_000}
        assert await pool.fetchval("SELECT count(*) FROM stock_voids_waiting") == 0
    assert await _fold(pool) == 0  # nothing new: nothing written
    state = await pool.fetchval(
        "SELECT state FROM catalog_entities WHERE scope = $1 AND key = 'bread'"
        " AND entity = 'stock_levels'",
        center,
    )
    assert state["min_qty_milli"] == 5_000  # the rest of the row is kept
    # Each voided receipt was put back once, by its first void; nothing is left pending.
    voided = await pool.fetch("SELECT register_id, seq, void_seq FROM stock_voided ORDER BY seq")
    assert [(v["register_id"], v["seq"], v["void_seq"]) for v in voided] == [
        (a.register_id, 1, 2),
        (a.register_id, 3, 4),
    ]
    assert await pool.fetchval("SELECT count(*) FROM stock_pending") == 0
    changes = await pool.fetchval(
        "SELECT count(*) FROM catalog_changelog WHERE entity = 'stock_levels'"
        " AND changed_by = 'stock:sales'"
    )
    assert changes == 1  # one pass wrote bread once


async def _duplicates(ingest: IngestService, count: int) -> bool:
    return ingest.stats.duplicates >= count


async def test_an_item_without_a_stock_row_gets_one_and_may_go_below_zero(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    center = new_id("c")
    till = Till(await enroll(center))
    async with till:
        await till.publish_documents(
            [till.document(1, "receipt", sale_body(1, [("water", 2_000), ("water", 250)]))]
        )
        await till.wait_for([1])
    await state_settled(pool)
    assert await _fold(pool) == 1
    # The registers sold it: the books say so, below zero.
    assert await _stock(pool, center) == {"water": -2_250}


async def test_a_fold_that_fails_leaves_its_moves_pending_and_the_pass_commits(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    center = new_id("c")
    till = Till(await enroll(center))
    async with till:
        await till.publish_documents([till.document(1, "receipt", sale_body(1, [("tea", 1_000)]))])
        await till.wait_for([1])
    await state_settled(pool)
    # A move for a center with no catalog scope (say, deleted by hand): that fold fails.
    await pool.execute(
        "INSERT INTO stock_pending (center_id, item_id, qty_milli) VALUES ('nowhere', 'x', 5)"
    )
    async with pool.acquire() as conn:
        result = await reconcile_pass(conn, None, hole_grace_s=60, request_cap_s=3600)
    assert result.locked
    assert result.stock_rows == 0
    # Nothing was taken: both moves wait for a pass that can fold them.
    assert await pool.fetchval("SELECT count(*) FROM stock_pending") == 2
    assert await _stock(pool, center) == {}
    await pool.execute("DELETE FROM stock_pending WHERE center_id = 'nowhere'")
    assert await _fold(pool) == 1
    assert await _stock(pool, center) == {"tea": -1_000}
