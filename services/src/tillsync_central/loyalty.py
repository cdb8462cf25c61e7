"""Loyalty points earned and redeemed at registers, posted to central's balances by
ingest, in the transaction that first stores the documents.

A new ``loyalty_accrual`` adds its points to the customer's ``loyalty_balances`` row and a
new ``loyalty_redemption`` takes them off, written like any catalog edit (changelog,
NOTIFY): the new balance fans out to every register of the scope. The row is the
register's center's live one if there is one, else the global one (created by the first
accrual). The documents of one batch are posted in seq order per register, and each
customer's balance is written once per batch.

Every posting is kept in ``loyalty_postings`` (document, delta, balance after, shortfall),
once per document: a redelivered document is a duplicate, stored once, posted once. A
redemption larger than the balance is never refused, since it already happened at the
till (offline, or another register spent the points first): the balance stops at 0, the
points it could not cover are the posting's ``shortfall``, and ``loyalty overdrawn`` is
logged as a warning for someone to look at.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import structlog

from tillsync_protocol import (
    GLOBAL_SCOPE,
    Document,
    LoyaltyAccrual,
    LoyaltyRedemption,
    TillsyncError,
)

from .catalog import Edit, current_rows, live_state, scope_order, write_edits
from .catalog_models import validate_state
from .dead_letters import Conn

__all__ = ["LoyaltyPosting", "loyalty_scopes", "post_loyalty"]

log = structlog.get_logger(__name__)

ENTITY = "loyalty_balances"
MAX_BALANCE = 10**12
"""The most points a balance holds (``catalog_models.Points``)."""
CHANGED_BY = "ingest:loyalty"

_IN_CENTERS = """
SELECT scope, key FROM catalog_entities
WHERE entity = 'loyalty_balances' AND NOT deleted AND key = ANY($1::text[])
  AND scope = ANY($2::text[])
"""
_INSERT_POSTINGS = """
INSERT INTO loyalty_postings (register_id, seq, doc_id, customer_id, scope, delta,
                              balance_after, shortfall)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::uuid[], $4::text[], $5::text[],
                     $6::bigint[], $7::bigint[], $8::bigint[])
"""

Loyalty = LoyaltyAccrual | LoyaltyRedemption


@dataclass(frozen=True)
class LoyaltyPosting:
    register_id: str
    seq: int
    doc_id: str
    customer_id: str
    scope: str
    delta: int
    balance_after: int
    shortfall: int


def _loyalty(documents: Sequence[Document]) -> list[Loyalty]:
    found = [d for d in documents if isinstance(d, (LoyaltyAccrual, LoyaltyRedemption))]
    return sorted(found, key=lambda d: (d.register_id, d.seq))


async def loyalty_scopes(conn: Conn, documents: Sequence[Document]) -> dict[tuple[str, int], str]:
    """Where each loyalty document's balance lives, by ``(register_id, seq)``: the
    register's center's live row if there is one, else the global row."""
    docs = _loyalty(documents)
    if not docs:
        return {}
    customers = sorted({d.body.customer_id for d in docs})
    centers = sorted({d.center_id for d in docs})
    in_center = {(r["scope"], r["key"]) for r in await conn.fetch(_IN_CENTERS, customers, centers)}
    return {
        (d.register_id, d.seq): d.center_id
        if (d.center_id, d.body.customer_id) in in_center
        else GLOBAL_SCOPE
        for d in docs
    }


async def post_loyalty(
    conn: Conn, documents: Sequence[Document], scopes: dict[tuple[str, int], str]
) -> list[LoyaltyPosting]:
    """Post the newly stored loyalty documents among ``documents`` (``scopes`` from
    :func:`loyalty_scopes`, whose catalog scopes the caller has locked, in
    :func:`~tillsync_central.catalog.scope_order` with any other it writes)."""
    docs = _loyalty(documents)
    if not docs:
        return []
    by_scope: dict[str, list[Loyalty]] = {}
    for document in docs:
        by_scope.setdefault(scopes[(document.register_id, document.seq)], []).append(document)
    postings: list[LoyaltyPosting] = []
    for scope in sorted(by_scope, key=scope_order):
        scope_docs = by_scope[scope]
        customers = sorted({d.body.customer_id for d in scope_docs})
        rows = await current_rows(conn, scope, [(ENTITY, c) for c in customers])
        states = {customer: live_state(rows.get((ENTITY, customer))) for customer in customers}
        for document in scope_docs:
            postings.append(_post(scope, document, states[document.body.customer_id]))
        edits = [
            Edit(scope, ENTITY, customer, "upsert", validate_state(ENTITY, states[customer]))
            for customer in customers
        ]
        await write_edits(conn, edits, CHANGED_BY)
    await conn.execute(
        _INSERT_POSTINGS,
        [p.register_id for p in postings],
        [p.seq for p in postings],
        [p.doc_id for p in postings],
        [p.customer_id for p in postings],
        [p.scope for p in postings],
        [p.delta for p in postings],
        [p.balance_after for p in postings],
        [p.shortfall for p in postings],
    )
    return postings


def _post(scope: str, document: Loyalty, state: dict[str, Any]) -> LoyaltyPosting:
    """Apply one document to ``state`` (in place); its posting."""
    points = document.body.points
    delta = points if isinstance(document, LoyaltyAccrual) else -points
    before = state.get("points", 0)
    total = (before if isinstance(before, int) else 0) + delta
    if total > MAX_BALANCE:
        # Raised inside the batch: the batch is applied again one document at a time,
        # and this one alone becomes a dead letter and a rejection with this code.
        raise TillsyncError(
            f"customer {document.body.customer_id}'s balance in scope {scope} would be "
            f"{total} points, more than the {MAX_BALANCE} a balance holds; nothing was posted",
            field="body.points",
            code="loyalty_limit",
        )
    shortfall = max(0, -total)
    state["points"] = max(0, total)
    posting = LoyaltyPosting(
        register_id=document.register_id,
        seq=document.seq,
        doc_id=document.doc_id,
        customer_id=document.body.customer_id,
        scope=scope,
        delta=delta,
        balance_after=max(0, total),
        shortfall=shortfall,
    )
    if shortfall:
        log.warning("loyalty overdrawn", redeemed=points, **asdict(posting))
    return posting
