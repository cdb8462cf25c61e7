"""Stock movements from what registers sell, and their folding into ``stock_levels``.

In the ingest transaction that first stores a document (:func:`record_movements`):

* a ``receipt`` takes each line's quantity out of its center's stock (``sale``);
* a ``refund`` puts each line's quantity back (``refund``; its lines list the goods
  returned, with positive quantities as on a receipt);
* a ``void`` puts back every line of the receipt it cancels (``void``), once however many
  voids name it (a unique index on the voided receipt's lines). A void stored before its
  receipt (registers' batches commit out of order) waits in ``stock_voids_waiting``; the
  next pass after the receipt arrives writes the reversal.

A redelivered document is a duplicate and records nothing. The reconciler's pass
(:func:`fold_stock`) takes every movement not yet applied, sums it per center and item,
and writes each changed ``stock_levels`` row once as an ordinary catalog change
(``changed_by`` ``stock:sales``) in the center's scope, so it fans out to the center's
registers at most once per pass. An item with no stock row in its center gets one.
Stock may go below zero: the registers sold it, and the books say so.
"""

from __future__ import annotations

from collections.abc import Sequence

import structlog

from tillsync_protocol import Document, Receipt, Refund, Void

from .catalog import Edit, current_rows, live_state, lock_scope, write_edits
from .catalog_models import validate_state
from .dead_letters import Conn

__all__ = ["fold_stock", "record_movements"]

log = structlog.get_logger(__name__)

ENTITY = "stock_levels"
CHANGED_BY = "stock:sales"

_INSERT = """
INSERT INTO stock_movements (register_id, seq, line_no, center_id, item_id, qty_milli, kind)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::integer[], $4::text[], $5::text[],
                     $6::bigint[], $7::text[])
ON CONFLICT DO NOTHING
"""
# The reversal of voids (given as register_id, seq): the sale lines of the receipt each
# names, put back under the void's key; a receipt is put back once (unique index).
_REVERSE = """
INSERT INTO stock_movements (register_id, seq, line_no, center_id, item_id, qty_milli, kind,
                             voids_register_id, voids_seq)
SELECT v.register_id, v.seq, m.line_no, m.center_id, m.item_id, -m.qty_milli, 'void',
       r.register_id, r.seq
FROM unnest($1::text[], $2::bigint[], $3::uuid[]) AS v(register_id, seq, voided_doc_id)
JOIN documents r ON r.doc_id = v.voided_doc_id
JOIN stock_movements m ON m.register_id = r.register_id AND m.seq = r.seq AND m.kind = 'sale'
ON CONFLICT DO NOTHING
"""
_WAIT = """
INSERT INTO stock_voids_waiting (register_id, seq, voided_doc_id)
SELECT v.register_id, v.seq, v.voided_doc_id
FROM unnest($1::text[], $2::bigint[], $3::uuid[]) AS v(register_id, seq, voided_doc_id)
WHERE NOT EXISTS (SELECT 1 FROM documents r WHERE r.doc_id = v.voided_doc_id)
ON CONFLICT DO NOTHING
"""
# Waiting voids whose receipt has arrived: reversed now, and forgotten.
_ARRIVED = """
DELETE FROM stock_voids_waiting w
WHERE EXISTS (SELECT 1 FROM documents r WHERE r.doc_id = w.voided_doc_id)
RETURNING register_id, seq, voided_doc_id
"""
_TAKE = """
WITH taken AS (
    UPDATE stock_movements SET applied_at = now()
    WHERE applied_at IS NULL
    RETURNING center_id, item_id, qty_milli
)
SELECT center_id, item_id, sum(qty_milli)::bigint AS qty_milli, count(*) AS n
FROM taken GROUP BY center_id, item_id ORDER BY center_id, item_id
"""


async def record_movements(conn: Conn, documents: Sequence[Document]) -> int:
    """Record the stock movements of newly stored documents; how many lines moved."""
    rows: list[tuple[str, int, int, str, str, int, str]] = []
    voids: list[Void] = []
    for document in documents:
        if isinstance(document, (Receipt, Refund)):
            sign, kind = (1, "refund") if isinstance(document, Refund) else (-1, "sale")
            rows.extend(
                (
                    document.register_id,
                    document.seq,
                    line.line_no,
                    document.center_id,
                    line.item_id,
                    sign * line.qty_milli,
                    kind,
                )
                for line in document.body.lines
            )
        elif isinstance(document, Void):
            voids.append(document)
    if rows:
        await conn.execute(_INSERT, *(list(column) for column in zip(*rows, strict=True)))
    if voids:
        keys = (
            [v.register_id for v in voids],
            [v.seq for v in voids],
            [v.body.voided_doc_id for v in voids],
        )
        await conn.execute(_REVERSE, *keys)
        await conn.execute(_WAIT, *keys)
    return len(rows)


async def fold_stock(conn: Conn) -> int:
    """Apply every pending movement to ``stock_levels`` in the caller's transaction; the
    number of stock rows written."""
    arrived = await conn.fetch(_ARRIVED)
    if arrived:
        await conn.execute(
            _REVERSE,
            [r["register_id"] for r in arrived],
            [r["seq"] for r in arrived],
            [r["voided_doc_id"] for r in arrived],
        )
    totals = await conn.fetch(_TAKE)
    by_center: dict[str, dict[str, int]] = {}
    for row in totals:
        if row["qty_milli"]:
            by_center.setdefault(row["center_id"], {})[row["item_id"]] = row["qty_milli"]
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
    if totals:
        log.info(
            "stock folded",
            movements=sum(int(row["n"]) for row in totals),
            items=sum(len(m) for m in by_center.values()),
            centers=len(by_center),
        )
    return written
