"""Item edits from registers, through real ingest: applied when still current, a
conflict that central wins when not, and never applied or recorded twice on redelivery."""

from __future__ import annotations

from typing import Any

import asyncpg
from tills import Till, canonical

from conftest import Enroll
from tillsync_central.catalog import CatalogEditor
from tillsync_central.runner import IngestService


def item(price: int = 2500, **extra: Any) -> dict[str, Any]:
    return {"name": "Bread", "gross_price": price, "currency": "CZK", "tax_rate_id": "t", **extra}


def edit_body(item_id: str, base_version: int, **changes: Any) -> dict[str, Any]:
    return {"item_id": item_id, "base_version": base_version, "changes": changes}


async def _row(pool: asyncpg.Pool, scope: str, key: str) -> asyncpg.Record:
    async with pool.acquire() as conn:
        return await conn.fetchrow(
            "SELECT version, state, scope_seq FROM catalog_entities"
            " WHERE scope = $1 AND entity = 'items' AND key = $2",
            scope,
            key,
        )


async def _conflicts(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch("SELECT * FROM catalog_conflicts ORDER BY id")


async def test_an_edit_based_on_the_current_version_is_applied_once(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    await CatalogEditor(pool).upsert("global", "items", "bread", item())
    async with Till(await enroll()) as till:
        raw = till.document(1, "item_edit", edit_body("bread", 1, gross_price=2700, labels=["x"]))
        payload = canonical(raw)
        await till.publish(payload, doc_type="item_edit", message_id=raw["doc_id"])
        acks = await till.wait_for([1])
        assert acks.accepted == {1}
        assert acks.rejected == {}
        row = await _row(pool, "global", "bread")
        assert (row["version"], row["state"]["gross_price"], row["state"]["labels"]) == (
            2,
            2700,
            ["x"],
        )
        assert row["state"]["name"] == "Bread"  # fields not in the edit are kept
        async with pool.acquire() as conn:
            changed_by = await conn.fetchval(
                "SELECT changed_by FROM catalog_changelog WHERE scope = 'global' AND scope_seq = 2"
            )
        assert changed_by == f"register:{till.register_id}"

        # A redelivery (the register resends the same bytes) is acked, not applied again.
        till.acks.accepted.clear()
        await till.publish(payload, doc_type="item_edit", message_id=raw["doc_id"])
        assert (await till.wait_for([1])).accepted == {1}
        assert (await _row(pool, "global", "bread"))["version"] == 2
    assert ingest.stats.item_edits_applied == 1
    assert await _conflicts(pool) == []


async def test_an_edit_that_lost_the_race_is_a_conflict_central_wins(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    editor = CatalogEditor(pool)
    await editor.upsert("global", "items", "bread", item())
    await editor.upsert("global", "items", "bread", item(2600))  # central moved to v2
    async with Till(await enroll()) as till:
        raw = till.document(1, "item_edit", edit_body("bread", 1, gross_price=2700))
        payload = canonical(raw)
        await till.publish(payload, doc_type="item_edit", message_id=raw["doc_id"])
        acks = await till.wait_for([1])
        assert acks.accepted == set()
        rejection = acks.rejected[1]
        assert (rejection.code, rejection.field, rejection.doc_id) == (
            "edit_conflict",
            "body.base_version",
            raw["doc_id"],
        )
        row = await _row(pool, "global", "bread")
        assert (row["version"], row["state"]["gross_price"]) == (2, 2600)

        # Redelivered: rejected the same way, still one conflict, one document.
        till.acks.rejected.clear()
        await till.publish(payload, doc_type="item_edit", message_id=raw["doc_id"])
        assert (await till.wait_for([1])).rejected[1].code == "edit_conflict"
    conflicts = await _conflicts(pool)
    assert [
        (c["code"], c["scope"], c["key"], c["base_version"], c["current_version"], c["proposed"])
        for c in conflicts
    ] == [("edit_conflict", "global", "bread", 1, 2, {"gross_price": 2700})]
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM documents") == 1
        assert (
            await conn.fetchval("SELECT last_seq FROM catalog_scopes WHERE scope = 'global'") == 2
        )


async def test_unknown_items_and_center_items(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    enrollment = await enroll()
    center = enrollment.center_id
    editor = CatalogEditor(pool)
    await editor.upsert("global", "items", "bread", item())
    await editor.upsert(center, "items", "bread", item(2400))  # the center's own row wins
    await editor.upsert("global", "items", "gone", item())
    await editor.delete("global", "items", "gone")
    async with Till(enrollment) as till:
        docs = [
            till.document(1, "item_edit", edit_body("bread", 1, name="Rye bread")),
            till.document(2, "item_edit", edit_body("nothing", 1, active=False)),
            till.document(3, "item_edit", edit_body("gone", 1, active=False)),
            till.document(4, "item_edit", edit_body("bread", 2, currency="EUR")),
        ]
        await till.publish_documents(docs)
        acks = await till.wait_for([1, 2, 3, 4])
    assert acks.accepted == {1, 4}
    assert {seq: r.code for seq, r in acks.rejected.items()} == {
        2: "unknown_item",
        3: "unknown_item",
    }
    center_row = await _row(pool, center, "bread")
    assert (center_row["version"], center_row["state"]["name"]) == (3, "Rye bread")
    assert center_row["state"]["currency"] == "EUR"
    assert (await _row(pool, "global", "bread"))["version"] == 1
