"""Loyalty points earned and redeemed at registers reach central's balances exactly once
(real RabbitMQ and PostgreSQL, the ingest workers): the balance, its changelog (so it fans
out), the ledger of postings, redeliveries, overdrafts, and center-scoped balances."""

from __future__ import annotations

import asyncpg

from central.conftest import Enroll, new_id
from central.tills import Till, until
from tillsync_central.catalog import CatalogEditor
from tillsync_central.runner import IngestService
from tillsync_protocol import GLOBAL_SCOPE


def _accrual(customer: str, points: int) -> dict[str, object]:
    return {"customer_id": customer, "points": points}


def _redemption(customer: str, points: int) -> dict[str, object]:
    return {"customer_id": customer, "points": points, "currency": "EUR", "amount": points}


async def _balance(pool: asyncpg.Pool, scope: str, customer: str) -> dict[str, object] | None:
    state = await pool.fetchval(
        "SELECT state FROM catalog_entities"
        " WHERE scope = $1 AND entity = 'loyalty_balances' AND key = $2 AND NOT deleted",
        scope,
        customer,
    )
    return None if state is None else dict(state)


async def test_accruals_and_redemptions_of_two_registers_are_posted_once(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    center = new_id("c")
    a, b = Till(await enroll(center)), Till(await enroll(center))
    customer, newcomer = new_id("cust"), new_id("cust")
    await CatalogEditor(pool).upsert(
        GLOBAL_SCOPE, "loyalty_balances", customer, {"points": 100, "tier": "gold"}
    )
    async with a, b:
        sent_a = await a.publish_documents(
            [
                a.document(1, "loyalty_accrual", _accrual(customer, 50)),
                a.document(2, "loyalty_redemption", _redemption(customer, 30)),
                a.document(3, "loyalty_accrual", _accrual(newcomer, 7)),
            ]
        )
        await b.publish_documents([b.document(1, "loyalty_accrual", _accrual(customer, 20))])
        await a.wait_for([1, 2, 3])
        await b.wait_for([1])
        assert a.acks.rejected == {}
        assert b.acks.rejected == {}

        # The same bytes again (a register resending after a lost ack): acknowledged
        # again, posted never again.
        for payload, doc_type in zip(
            sent_a, ("loyalty_accrual", "loyalty_redemption", "loyalty_accrual"), strict=True
        ):
            await a.publish(payload, doc_type=doc_type)
        await until(lambda: _duplicates(ingest, 3), timeout=30)
    assert await pool.fetchval("SELECT count(*) FROM loyalty_postings") == 4

    assert await _balance(pool, GLOBAL_SCOPE, customer) == {"points": 140, "tier": "gold"}
    assert await _balance(pool, GLOBAL_SCOPE, newcomer) == {"points": 7, "tier": None}
    postings = await pool.fetch(
        "SELECT register_id, seq, customer_id, scope, delta, balance_after, shortfall"
        " FROM loyalty_postings ORDER BY posted_at, register_id, seq"
    )
    assert sorted((p["register_id"], p["seq"], p["delta"], p["shortfall"]) for p in postings) == (
        sorted(
            [
                (a.register_id, 1, 50, 0),
                (a.register_id, 2, -30, 0),
                (a.register_id, 3, 7, 0),
                (b.register_id, 1, 20, 0),
            ]
        )
    )
    assert {p["scope"] for p in postings} == {GLOBAL_SCOPE}
    # Written as catalog changes, so they fan out like any edit.
    changes = await pool.fetch(
        "SELECT key, state, changed_by FROM catalog_changelog"
        " WHERE entity = 'loyalty_balances' AND changed_by = 'ingest:loyalty'"
    )
    assert {c["key"] for c in changes} == {customer, newcomer}
    latest = await pool.fetchval(
        "SELECT state FROM catalog_changelog WHERE entity = 'loyalty_balances' AND key = $1"
        " ORDER BY scope_seq DESC LIMIT 1",
        customer,
    )
    assert latest == {"points": 140, "tier": "gold"}


async def _duplicates(ingest: IngestService, count: int) -> bool:
    return ingest.stats.duplicates >= count


async def test_a_redemption_beyond_the_balance_is_kept_with_its_shortfall(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    till = Till(await enroll())
    customer = new_id("cust")
    await CatalogEditor(pool).upsert(GLOBAL_SCOPE, "loyalty_balances", customer, {"points": 40})
    async with till:
        await till.publish_documents(
            [till.document(1, "loyalty_redemption", _redemption(customer, 100))]
        )
        await till.wait_for([1])
    # It happened at the till: accepted, never refused; the balance stops at 0.
    assert till.acks.accepted == {1}
    assert till.acks.rejected == {}
    assert await _balance(pool, GLOBAL_SCOPE, customer) == {"points": 0, "tier": None}
    row = await pool.fetchrow(
        "SELECT delta, balance_after, shortfall FROM loyalty_postings WHERE register_id = $1",
        till.register_id,
    )
    assert tuple(row) == (-100, 0, 60)


async def test_an_accrual_past_the_balance_limit_is_refused_and_the_rest_flows(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    till = Till(await enroll())
    customer, other = new_id("cust"), new_id("cust")
    limit = 10**12
    await CatalogEditor(pool).upsert(
        GLOBAL_SCOPE, "loyalty_balances", customer, {"points": limit - 5}
    )
    async with till:
        sent = await till.publish_documents(
            [
                till.document(1, "loyalty_accrual", _accrual(customer, 5)),
                till.document(2, "loyalty_accrual", _accrual(customer, 1)),
                till.document(3, "loyalty_accrual", _accrual(other, 9)),
            ]
        )
        await till.wait_for([1, 2, 3])
    # The first reaches the limit exactly; the second would pass it: refused with its
    # own code and field, the others posted.
    assert till.acks.accepted == {1, 3}
    assert set(till.acks.rejected) == {2}
    rejection = till.acks.rejected[2]
    assert (rejection.code, rejection.field) == ("loyalty_limit", "body.points")
    assert str(limit) in rejection.reason
    assert await _balance(pool, GLOBAL_SCOPE, customer) == {"points": limit, "tier": None}
    assert await _balance(pool, GLOBAL_SCOPE, other) == {"points": 9, "tier": None}
    postings = await pool.fetch(
        "SELECT seq, delta, balance_after FROM loyalty_postings WHERE register_id = $1"
        " ORDER BY seq",
        till.register_id,
    )
    assert [tuple(p) for p in postings] == [(1, 5, limit), (3, 9, 9)]
    letter = await pool.fetchrow(
        "SELECT code, field, seq, payload FROM dead_letters WHERE register_id = $1",
        till.register_id,
    )
    assert (letter["code"], letter["field"], letter["seq"]) == ("loyalty_limit", "body.points", 2)
    assert bytes(letter["payload"]) == sent[1]
    stored = await pool.fetchval(
        "SELECT count(*) FROM documents WHERE register_id = $1", till.register_id
    )
    assert stored == 2


async def test_a_center_balance_is_posted_where_it_lives(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    center = new_id("c")
    till = Till(await enroll(center))
    customer = new_id("cust")
    editor = CatalogEditor(pool)
    await editor.upsert(GLOBAL_SCOPE, "loyalty_balances", customer, {"points": 1000})
    await editor.upsert(center, "loyalty_balances", customer, {"points": 10})
    async with till:
        await till.publish_documents([till.document(1, "loyalty_accrual", _accrual(customer, 5))])
        await till.wait_for([1])
    assert await _balance(pool, center, customer) == {"points": 15, "tier": None}
    assert await _balance(pool, GLOBAL_SCOPE, customer) == {"points": 1000, "tier": None}
    assert (
        await pool.fetchval(
            "SELECT scope FROM loyalty_postings WHERE register_id = $1", till.register_id
        )
        == center
    )
