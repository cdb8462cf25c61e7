"""Stock moved by what registers sell, and its folding into ``stock_levels``.

In the ingest transaction that first stores documents:

* a ``receipt`` takes each line's quantity out of its center's stock;
* a ``refund`` puts each line's quantity back (its lines list the goods returned, with
  positive quantities as on a receipt);
* a ``void`` puts back every line of the receipt it cancels, once however many voids
  name it (``stock_voided``). A void stored before its receipt (registers' batches commit
  out of order) waits in ``stock_voids_waiting``; the first pass after the receipt
  arrives puts it back.

What a batch moves is summed per center and item and added to ``stock_pending``: a few
rows per batch, insert-only, so concurrent workers never wait on each other. A
redelivered document is a duplicate and moves nothing. The receipts' and refunds' lines
(:func:`sale_line_columns`) are summed and inserted by the documents' own statement
(:mod:`tillsync_central.store`), joined to the documents it stored; the voids', which
need the receipts they name, by :func:`record_voids` after it.

The reconciler's pass (:func:`fold_stock`) deletes the pending rows it can see, sums them
per center and item, and writes each changed ``stock_levels`` row once as an ordinary
catalog change (``changed_by`` ``stock:sales``) in the center's scope, so it fans out to
the center's registers at most once per pass. A row still being written by an open
ingest transaction is invisible to the pass and left for the next one. An item with no
stock row in its center gets one; stock may go below zero (the registers sold it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import structlog

from tillsync_protocol import Document, Receipt, Refund, Void

from .catalog import Edit, current_rows, live_state, lock_scope, write_edits
from .catalog_models import validate_state
from .dead_letters import Conn

__all__ = ["fold_stock", "record_voids", "sale_line_columns"]

log = structlog.get_logger(__name__)

ENTITY = "stock_levels"
CHANGED_BY = "stock:sales"

Totals = dict[tuple[str, str], int]
"""Quantity moved (thousandths, signed) per ``(center_id, item_id)``."""

_PENDING = """
INSERT INTO stock_pending (center_id, item_id, qty_milli)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[])
"""
# Voids given as (register_id, seq, voided_doc_id): claim each stored receipt they name
# (once ever), and sum the claimed receipts' lines per center and item.
_PUT_BACK = """
WITH v AS (
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::uuid[])
        AS v(register_id, seq, voided_doc_id)
), claimed AS (
    INSERT INTO stock_voided (register_id, seq, void_register_id, void_seq)
    SELECT r.register_id, r.seq, v.register_id, v.seq
    FROM v JOIN documents r ON r.doc_id = v.voided_doc_id AND r.doc_type = 'receipt'
    ON CONFLICT DO NOTHING
    RETURNING register_id, seq
)
SELECT r.center_id, l ->> 'item_id' AS item_id, sum((l ->> 'qty_milli')::bigint)::bigint AS qty
FROM claimed c
JOIN documents r USING (register_id, seq)
CROSS JOIN LATERAL jsonb_array_elements(r.payload_json -> 'body' -> 'lines') AS l
GROUP BY 1, 2
"""
_WAIT = """
INSERT INTO stock_voids_waiting (register_id, seq, voided_doc_id)
SELECT v.register_id, v.seq, v.voided_doc_id
FROM unnest($1::text[], $2::bigint[], $3::uuid[]) AS v(register_id, seq, voided_doc_id)
WHERE NOT EXISTS (SELECT 1 FROM documents r WHERE r.doc_id = v.voided_doc_id)
ON CONFLICT DO NOTHING
"""
# Waiting voids whose receipt has arrived: forgotten now, their receipts put back.
_ARRIVED = """
DELETE FROM stock_voids_waiting w
WHERE EXISTS (SELECT 1 FROM documents r WHERE r.doc_id = w.voided_doc_id)
RETURNING register_id, seq, voided_doc_id
"""
_TAKE = """
WITH taken AS (DELETE FROM stock_pending RETURNING center_id, item_id, qty_milli)
SELECT center_id, item_id, sum(qty_milli)::bigint AS qty_milli, count(*) AS n
FROM taken GROUP BY center_id, item_id
"""


def sale_line_columns(documents: Sequence[Document]) -> list[list[Any]]:
    """The stock lines of the receipts and refunds among ``documents``, one list per
    column: ``register_id, seq`` (to join to the documents stored), ``center_id,
    item_id, qty_milli`` (signed: a receipt's lines out, a refund's back)."""
    columns: list[list[Any]] = [[], [], [], [], []]
    register_ids, seqs, centers, items, quantities = columns
    for document in documents:
        if isinstance(document, (Receipt, Refund)):
            sign = 1 if isinstance(document, Refund) else -1
            for line in document.body.lines:
                register_ids.append(document.register_id)
                seqs.append(document.seq)
                centers.append(document.center_id)
                items.append(line.item_id)
                quantities.append(sign * line.qty_milli)
    return columns


async def record_voids(conn: Conn, documents: Sequence[Document]) -> None:
    """Put back what the newly stored voids among ``documents`` cancel (into
    ``stock_pending``), or keep them waiting for their receipts."""
    voids = [d for d in documents if isinstance(d, Void)]
    if not voids:
        return
    keys = (
        [v.register_id for v in voids],
        [v.seq for v in voids],
        [v.body.voided_doc_id for v in voids],
    )
    totals: Totals = defaultdict(int)
    await _put_back(conn, keys, totals)
    await conn.execute(_WAIT, *keys)
    moved = [(key, qty) for key, qty in sorted(totals.items()) if qty]
    if moved:
        await conn.execute(
            _PENDING,
            [center for (center, _), _ in moved],
            [item for (_, item), _ in moved],
            [qty for _, qty in moved],
        )


async def _put_back(
    conn: Conn, voids: tuple[list[str], list[int], list[str]], totals: Totals
) -> None:
    for row in await conn.fetch(_PUT_BACK, *voids):
        totals[(row["center_id"], row["item_id"])] += row["qty"]


async def fold_stock(conn: Conn) -> int:
    """Apply the pending stock moves to ``stock_levels`` in the caller's transaction; the
    number of stock rows written."""
    totals: Totals = defaultdict(int)
    arrived = await conn.fetch(_ARRIVED)
    if arrived:
        voids = (
            [r["register_id"] for r in arrived],
            [r["seq"] for r in arrived],
            [str(r["voided_doc_id"]) for r in arrived],
        )
        await _put_back(conn, voids, totals)
    taken = await conn.fetch(_TAKE)
    for row in taken:
        totals[(row["center_id"], row["item_id"])] += row["qty_milli"]
    by_center: dict[str, dict[str, int]] = defaultdict(dict)
    for (center, item), qty in totals.items():
        if qty:
            by_center[center][item] = qty
    written = 0
    for center in sorted(by_center):
        moved = by_center[center]
        await lock_scope(conn, center)
        current = await current_rows(conn, center, [(ENTITY, item) for item in moved])
        edits = []
        for item, qty in sorted(moved.items()):
            state = live_state(current.get((ENTITY, item)))
            before = state.get("qty_milli", 0)
            state["qty_milli"] = (before if isinstance(before, int) else 0) + qty
            edits.append(Edit(center, ENTITY, item, "upsert", validate_state(ENTITY, state)))
        written += len(await write_edits(conn, edits, CHANGED_BY))
    if taken or arrived:
        log.info(
            "stock folded",
            pending_rows=sum(int(row["n"]) for row in taken),
            voids_arrived=len(arrived),
            items=sum(len(m) for m in by_center.values()),
            centers=len(by_center),
        )
    return written
