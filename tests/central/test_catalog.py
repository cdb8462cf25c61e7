"""The catalog editor against real PostgreSQL: rows, changelog, counters, tombstones,
contiguous scope_seq under concurrent writers, refusals, and the NOTIFY that wakes the relay."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from conftest import new_id
from tillsync_central.catalog import (
    NOTIFY_CHANNEL,
    CatalogEditor,
    CatalogError,
    prepare_edit,
    write_edits,
)
from tillsync_central.catalog_models import ENTITY_MODELS, validate_state
from tillsync_protocol import ENTITIES, TillsyncError


def item(name: str = "Bread", price: int = 2500, **extra: Any) -> dict[str, Any]:
    return {"name": name, "gross_price": price, "currency": "CZK", "tax_rate_id": "cz-12", **extra}


async def _center(pool: asyncpg.Pool) -> str:
    center = new_id("c")
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO centers (center_id, name) VALUES ($1, $1)", center)
    return center


async def _changelog(pool: asyncpg.Pool, scope: str) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch(
            "SELECT * FROM catalog_changelog WHERE scope = $1 ORDER BY scope_seq", scope
        )


def test_every_protocol_entity_has_a_model() -> None:
    assert set(ENTITY_MODELS) == set(ENTITIES)


@pytest.mark.parametrize(
    ("entity", "state", "code", "field"),
    [
        ("items", item(price=25.5), "float_not_allowed", "state.gross_price"),
        ("items", item(price="2500"), "wrong_type", "state.gross_price"),
        ("items", item(colour="red"), "unknown_field", "state.colour"),
        ("items", {"gross_price": 1, "currency": "CZK", "tax_rate_id": "t"}, "missing_field",
         "state.name"),
        ("exchange_rates", {"currency": "EUR", "base_currency": "CZK", "rate": 25.1},
         "float_not_allowed", "state.rate"),
        ("stock_levels", {"qty_milli": "1.5"}, "wrong_type", "state.qty_milli"),
        ("commercial_rules", {"name": "x", "kind": "amount", "amount": 100}, "invalid_value",
         "state"),
    ],
)  # fmt: skip
def test_states_are_validated_strictly(
    entity: str, state: dict[str, Any], code: str, field: str
) -> None:
    with pytest.raises(TillsyncError) as caught:
        validate_state(entity, state)
    assert (caught.value.code, caught.value.field) == (code, field)


def test_a_valid_state_is_canonical_with_defaults() -> None:
    assert validate_state("exchange_rates", {"currency": "EUR", "base_currency": "CZK",
                                             "rate": "25.125"}) == {
        "currency": "EUR", "base_currency": "CZK", "rate": "25.125", "valid_from": None,
    }  # fmt: skip
    assert validate_state("items", item())["barcodes"] == []


async def test_upsert_update_delete_and_resurrect_one_row(pool: asyncpg.Pool) -> None:
    editor = CatalogEditor(pool, changed_by="test")
    first = await editor.upsert("global", "items", "bread", item())
    assert (first.scope_seq, first.version, first.op) == (1, 1, "upsert")
    second = await editor.upsert("global", "items", "bread", item(price=2600))
    assert (second.scope_seq, second.version) == (2, 2)
    # The same state again writes nothing and answers with the change that holds it.
    same = await editor.upsert("global", "items", "bread", item(price=2600))
    assert (same.scope_seq, same.version) == (2, 2)
    deleted = await editor.delete("global", "items", "bread")
    assert deleted is not None
    assert (deleted.scope_seq, deleted.version, deleted.op, deleted.state) == (3, 3, "delete", None)
    assert await editor.delete("global", "items", "bread") is None
    assert await editor.delete("global", "items", "never") is None
    back = await editor.upsert("global", "items", "bread", item())
    assert (back.scope_seq, back.version) == (4, 4)

    log = await _changelog(pool, "global")
    assert [(r["scope_seq"], r["op"], r["version"]) for r in log] == [
        (1, "upsert", 1), (2, "upsert", 2), (3, "delete", 3), (4, "upsert", 4),
    ]  # fmt: skip
    assert log[1]["state"]["gross_price"] == 2600
    assert {r["changed_by"] for r in log} == {"test"}
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT * FROM catalog_entities WHERE scope = 'global' AND key = 'bread'"
        )
        assert (row["version"], row["scope_seq"], row["deleted"]) == (4, 4, False)
        assert (
            await conn.fetchval("SELECT last_seq FROM catalog_scopes WHERE scope = 'global'") == 4
        )


async def test_one_apply_is_one_transaction_over_several_scopes(pool: asyncpg.Pool) -> None:
    center = await _center(pool)
    editor = CatalogEditor(pool)
    changes = await editor.apply(
        [
            prepare_edit(center, "prices", "bread", state={"gross_price": 2400,
                                                           "currency": "CZK"}),
            prepare_edit("global", "items", "bread", state=item()),
            prepare_edit("global", "items", "bread", state=item(price=2700)),
            prepare_edit(center, "stock_levels", "bread", state={"qty_milli": 1500}),
        ]
    )  # fmt: skip
    assert [(c.scope, c.scope_seq, c.version) for c in changes] == [
        ("global", 1, 1), ("global", 2, 2), (center, 1, 1), (center, 2, 1),
    ]  # fmt: skip


async def test_edits_of_an_unknown_center_are_refused_whole(pool: asyncpg.Pool) -> None:
    editor = CatalogEditor(pool)
    with pytest.raises(CatalogError) as caught:
        await editor.apply(
            [
                prepare_edit("global", "items", "bread", state=item()),
                prepare_edit("no-such-center", "stock_levels", "bread", state={"qty_milli": 1}),
            ]
        )
    assert (caught.value.code, caught.value.field) == ("unknown_scope", "scope")
    assert "no-such-center" in caught.value.reason
    assert await _changelog(pool, "global") == []  # the global part was rolled back too

    with pytest.raises(CatalogError) as invalid:
        prepare_edit("some-center", "centers", "x", state={"name": "X", "currency": "CZK"})
    assert invalid.value.code == "invalid_scope"
    with pytest.raises(TillsyncError) as bad_scope:
        prepare_edit("Praha 1", "items", "x", state=item())
    assert (bad_scope.value.code, bad_scope.value.field) == ("invalid_value", "scope")


async def test_a_center_upserted_in_the_catalog_gets_its_scope(pool: asyncpg.Pool) -> None:
    editor = CatalogEditor(pool)
    center = new_id("c")
    await editor.upsert("global", "centers", center, {"name": "Praha 1", "currency": "CZK"})
    change = await editor.upsert(center, "stock_levels", "bread", {"qty_milli": 2000})
    assert (change.scope, change.scope_seq) == (center, 1)
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT name FROM centers WHERE center_id = $1", center) == (
            "Praha 1"
        )


async def test_concurrent_writers_of_one_scope_get_contiguous_seqs(pool: asyncpg.Pool) -> None:
    """N transactions at once, some rolled back after writing: every committed change has
    its own scope_seq, 1..N with no hole, in commit order."""
    center = await _center(pool)
    editor = CatalogEditor(pool)
    writers = 60

    async def write(n: int) -> None:
        await editor.upsert(center, "items", f"item-{n}", item(f"Item {n}", 100 + n))

    async def roll_back(n: int) -> None:
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                await write_edits(
                    conn, [prepare_edit(center, "items", f"gone-{n}", state=item())], "test"
                )
                await asyncio.sleep(0.01)
            finally:
                await tx.rollback()

    tasks = [write(n) for n in range(writers)] + [roll_back(n) for n in range(10)]
    await asyncio.gather(*tasks)

    log = await _changelog(pool, center)
    assert [r["scope_seq"] for r in log] == list(range(1, writers + 1))
    assert {r["key"] for r in log} == {f"item-{n}" for n in range(writers)}
    # Commit order is seq order: later seqs never committed earlier.
    times = [r["changed_at"] for r in log]
    assert times == sorted(times)
    async with pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT last_seq FROM catalog_scopes WHERE scope = $1", center)
            == writers
        )
        assert (
            await conn.fetchval("SELECT count(*) FROM catalog_entities WHERE scope = $1", center)
            == writers
        )


async def test_a_commit_notifies_the_scope(pool: asyncpg.Pool) -> None:
    center = await _center(pool)
    heard: asyncio.Queue[str] = asyncio.Queue()

    def on_notify(*args: Any) -> None:
        heard.put_nowait(args[3])

    async with pool.acquire() as listener:
        await listener.add_listener(NOTIFY_CHANNEL, on_notify)
        try:
            await CatalogEditor(pool).upsert(center, "stock_levels", "x", {"qty_milli": 5})
            assert await asyncio.wait_for(heard.get(), 5) == center
        finally:
            await listener.remove_listener(NOTIFY_CHANNEL, on_notify)
