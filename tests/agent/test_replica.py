"""The catalog replica on a real SQLite file: real-time changes, deltas, reinits, labels,
barcodes, prices, notifications and item edits."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from tillsync_agent.catalog_events import CatalogEvent
from tillsync_agent.replica import ApplyMode, Replica, UnknownItemError, _json
from tillsync_protocol import (
    ENTITIES,
    CatalogChangeBody,
    FloatNotAllowedError,
    InvalidValueError,
    ItemEdit,
    decode_document,
)
from tillsync_protocol.control import CatalogValue

from .catalog import CENTER, change, item_state, new_request_id, open_replica, pages


async def barcode_owner(replica: Replica, barcode: str) -> str | None:
    entry = await replica.item_by_barcode(barcode)
    return None if entry is None else entry.key


async def price_field(replica: Replica, key: str, at: int, name: str) -> object:
    price = await replica.price(key, at=at)
    assert price is not None
    return getattr(price, name)


async def state_of(replica: Replica, key: str) -> dict[str, Any]:
    entry = await replica.item(key)
    assert entry is not None
    return dict(entry.state)


def rows(path: Path, sql: str, *params: object) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql, params).fetchall()


def staged_rows(path: Path) -> int:
    """Rows left in every staging table (none once an answer is applied)."""
    tables = ("catalog_staging", "catalog_shadow", "catalog_next", "item_barcodes_next",
              "catalog_next_drops")  # fmt: skip
    with sqlite3.connect(path) as db:
        return sum(db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables)


def catalog_keys(path: Path, entity: str = "items") -> list[str]:
    return [
        str(r[0])
        for r in rows(path, "SELECT key FROM catalog WHERE entity = ? ORDER BY key", entity)
    ]


async def test_changes_apply_in_order_duplicates_are_ignored_and_gaps_are_reported(
    tmp_path: Path,
) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db) as (_, replica, _):
        assert await replica.apply_change(change(1, "i-1")) == "applied"
        assert await replica.apply_change(change(2, "i-2")) == "applied"
        assert await replica.apply_change(change(2, "i-2", item_state("other"))) == "duplicate"
        assert await replica.apply_change(change(1, "i-1", item_state("other"))) == "duplicate"
        assert await replica.apply_change(change(4, "i-4")) == "gap"
        assert await replica.apply_change(change(1, "x", scope="c-2")) == "ignored"
        assert await replica.apply_change(change(1, "p-1", entity="taxes", scope=CENTER)) == (
            "applied"
        )
        assert await replica.cursors() == {"global": 2, CENTER: 1}
        item = await replica.item("i-2")
        assert item is not None
        assert item.state["name"] == "i-2"
        assert item.version == 1
    # The gap wrote nothing; the duplicates changed nothing.
    assert catalog_keys(db) == ["i-1", "i-2"]
    assert '"i-1"' in str(rows(db, "SELECT state FROM catalog WHERE key = 'i-1'")[0][0])


async def test_delete_removes_the_row_and_its_barcodes(tmp_path: Path) -> None:
    async with open_replica(tmp_path / "a.db") as (_, replica, _):
        await replica.apply_change(change(1, "i-1", item_state(barcodes=["859001", "859002"])))
        found = await replica.item_by_barcode("859002")
        assert found is not None
        assert found.key == "i-1"
        await replica.apply_change(change(2, "i-1", item_state(barcodes=["859003"]), version=2))
        assert await replica.item_by_barcode("859001") is None
        assert await barcode_owner(replica, "859003") == "i-1"
        await replica.apply_change(change(3, "i-1", op="delete", version=3))
        assert await replica.item("i-1") is None
        assert await replica.item_by_barcode("859003") is None
    assert rows(tmp_path / "a.db", "SELECT COUNT(*) FROM item_barcodes") == [(0,)]


async def test_a_price_change_keeps_the_barcodes_and_a_barcode_change_rebuilds_them(
    tmp_path: Path,
) -> None:
    """An item whose barcodes stay is one UPDATE (its barcodes are not touched); any
    other change of an item rebuilds them, the same array in another order included."""
    db = tmp_path / "a.db"
    async with open_replica(db) as (store, replica, _):
        statements: list[str] = []
        await store.in_thread(lambda conn: conn.set_trace_callback(statements.append))

        async def apply(seq: int, price: int, barcodes: list[str]) -> list[str]:
            statements.clear()
            state = item_state(price=price, barcodes=barcodes)
            assert await replica.apply_change(change(seq, "i-1", state, version=seq)) == "applied"
            return [s for s in statements if "item_barcodes" in s]

        assert await apply(1, 100, ["111", "222"])  # a new item: built
        assert await apply(2, 120, ["111", "222"]) == []  # a price change: untouched
        assert (await state_of(replica, "i-1"))["gross_price"] == 120
        assert [await barcode_owner(replica, b) for b in ("111", "222")] == ["i-1", "i-1"]
        assert await apply(3, 120, ["222", "444"])  # one barcode gone, one new
        assert await barcode_owner(replica, "111") is None
        assert await barcode_owner(replica, "444") == "i-1"
        assert await apply(4, 130, ["444", "222"])  # the same barcodes, in another order
        await store.in_thread(lambda conn: conn.set_trace_callback(None))
    assert rows(db, "SELECT barcode, item_key FROM item_barcodes ORDER BY barcode") == [
        ("222", "i-1"),
        ("444", "i-1"),
    ]
    assert rows(db, "SELECT version, scope_seq, local_edit FROM catalog") == [(4, 4, 0)]


async def test_a_barcode_moved_to_another_item_follows_it(tmp_path: Path) -> None:
    async with open_replica(tmp_path / "a.db") as (_, replica, _):
        await replica.apply_change(change(1, "i-1", item_state(barcodes=["111"])))
        await replica.apply_change(change(2, "i-2", item_state(barcodes=["111"])))
        assert await barcode_owner(replica, "111") == "i-2"
        await replica.apply_change(change(3, "i-1", op="delete", version=2))
        assert await barcode_owner(replica, "111") == "i-2"


async def test_labels_filter_items_and_the_cursor_still_advances(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db, labels=["bistro"]) as (_, replica, _):
        await replica.apply_change(change(1, "plain", item_state()))
        await replica.apply_change(change(2, "bistro", item_state(labels=["bistro", "x"])))
        await replica.apply_change(change(3, "fuel", item_state(labels=["fuel"], barcodes=["9"])))
        # An item we kept gets a label that is not ours: it goes, with its barcodes.
        await replica.apply_change(
            change(4, "plain", item_state(labels=["fuel"], barcodes=["7"]), version=2)
        )
        assert catalog_keys(db) == ["bistro"]
        assert await replica.item_by_barcode("9") is None
        assert await replica.cursors() == {"global": 4}
        # Other entities are never filtered.
        await replica.apply_change(change(5, "k", {"labels": ["fuel"]}, entity="settings"))
        assert await replica.get("settings", "k") is not None


async def test_a_register_without_labels_keeps_labelled_items(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db) as (_, replica, _):
        await replica.apply_change(change(1, "plain", item_state()))
        await replica.apply_change(change(2, "fuel", item_state(labels=["fuel"], barcodes=["9"])))
        request_id = new_request_id()
        await replica.begin_staging(request_id)
        await replica.stage(request_id, pages([change(3, "bar", item_state(labels=["bar"]))], 1,
                                              request_id)[0])  # fmt: skip
        await replica.apply_staged(
            request_id, mode="delta", entities=ENTITIES, cursors={"global": 3}
        )
        assert catalog_keys(db) == ["bar", "fuel", "plain"]
        found = await replica.item_by_barcode("9")
        assert found is not None
        assert found.key == "fuel"


async def test_center_price_overrides_the_global_price(tmp_path: Path) -> None:
    async with open_replica(tmp_path / "a.db") as (_, replica, _):
        await replica.apply_change(change(1, "i-1", item_state(price=1000)))
        price = await replica.price("i-1")
        assert price is not None
        assert (price.gross_price, price.source) == (1000, "global")
        await replica.apply_change(
            change(
                1,
                "i-1",
                {"gross_price": 900, "currency": "CZK", "valid_from": 1000, "valid_to": 5000},
                entity="prices",
                scope=CENTER,
            )
        )
        assert await price_field(replica, "i-1", 2000, "gross_price") == 900
        assert await price_field(replica, "i-1", 2000, "source") == "center"
        assert await price_field(replica, "i-1", 5000, "gross_price") == 1000
        assert await price_field(replica, "i-1", 999, "gross_price") == 1000
        assert await replica.price("nope") is None


async def test_center_row_wins_in_get_all_and_search(tmp_path: Path) -> None:
    async with open_replica(tmp_path / "a.db") as (_, replica, _):
        await replica.apply_change(change(1, "i-1", item_state("Chléb kmínový")))
        await replica.apply_change(change(2, "i-2", item_state("ŠUNKA dušená", barcodes=["42"])))
        await replica.apply_change(change(1, "i-1", item_state("Chléb místní"), scope=CENTER))
        assert [e.scope for e in await replica.all("items") if e.key == "i-1"] == [CENTER]
        everything = await replica.all("items")
        assert [(e.key, e.scope) for e in everything] == [("i-1", CENTER), ("i-2", "global")]
        assert [e.key for e in await replica.search("chléb")] == ["i-1"]
        assert [e.state["name"] for e in await replica.search("chléb")] == ["Chléb místní"]
        assert [e.key for e in await replica.search("šunka")] == ["i-2"]  # beyond ASCII
        assert [e.key for e in await replica.search("42")] == ["i-2"]  # a barcode
        assert [e.key for e in await replica.search("i-2")] == ["i-2"]  # a key
        assert await replica.search("  ") == []
        assert [e.state["name"] for e in await replica.search("é", limit=1)] == ["Chléb místní"]


async def stage_all(
    replica: Replica,
    changes: list[CatalogChangeBody],
    request_id: str,
    size: int = 2,
    mode: ApplyMode = "delta",
) -> None:
    await replica.begin_staging(request_id, mode)
    for page in pages(changes, size, request_id):
        await replica.stage(request_id, page)


async def test_a_delta_is_invisible_until_applied_with_its_cursors_in_one_transaction(
    tmp_path: Path,
) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db) as (_, replica, _):
        await replica.apply_change(change(1, "old", item_state(barcodes=["1"])))
        request_id = new_request_id()
        delta = [
            change(2, "a"),
            change(3, "b", item_state(barcodes=["2"])),
            change(4, "old", op="delete", version=2),
            change(5, "c"),
            change(1, "t", {"rate_bp": 2100}, entity="taxes", scope=CENTER),
            change(7, "x", scope="c-2"),  # not ours: left out
        ]
        await stage_all(replica, delta, request_id)
        # Staged, not applied: readers still see the old catalog and cursors.
        assert [e.key for e in await replica.all("items")] == ["old"]
        assert await replica.cursors() == {"global": 1}
        applied = await replica.apply_staged(
            request_id, mode="delta", entities=ENTITIES, cursors={"global": 5, CENTER: 1}
        )
        assert (applied.received, applied.applied) == (5, 5)
        assert applied.cursors == {"global": 5, CENTER: 1}
        assert [e.key for e in await replica.all("items")] == ["a", "b", "c"]
        assert await barcode_owner(replica, "2") == "b"
        assert await replica.item_by_barcode("1") is None
        assert await replica.cursors() == {"global": 5, CENTER: 1}
        # Real-time changes the delta already covered are duplicates now.
        assert await replica.apply_change(change(5, "c")) == "duplicate"
        assert await replica.apply_change(change(6, "d")) == "applied"
    assert staged_rows(db) == 0


async def test_a_delta_that_fails_while_applying_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db) as (_, replica, _):
        await replica.apply_change(change(1, "old"))
        request_id = new_request_id()
        await stage_all(replica, [change(2, "a"), change(3, "old", op="delete")], request_id)

        async def broken(*args: object) -> None:
            raise RuntimeError("disk full")

        monkeypatch.setattr("tillsync_agent.replica._sync_barcodes", broken)
        with pytest.raises(RuntimeError):
            await replica.apply_staged(
                request_id, mode="delta", entities=ENTITIES, cursors={"global": 3}
            )
        assert [e.key for e in await replica.all("items")] == ["old"]
        assert await replica.cursors() == {"global": 1}


async def test_a_change_whose_transaction_fails_moves_no_cursor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cursors the replica keeps in memory follow commits only: the change that failed
    is applied when it comes again, not taken for a duplicate."""
    async with open_replica(tmp_path / "a.db") as (_, replica, _):
        assert await replica.apply_change(change(1, "a")) == "applied"

        calls: list[object] = []

        def broken(state: Mapping[str, CatalogValue] | None) -> str:
            calls.append(state)
            if len(calls) > 1:  # the second change, after the first has moved the cursor
                raise RuntimeError("disk full")
            return _json(state)

        monkeypatch.setattr("tillsync_agent.replica._json", broken)
        with pytest.raises(RuntimeError):
            await replica.apply_changes([change(2, "b"), change(3, "c")])
        monkeypatch.undo()
        assert await replica.cursors() == {"global": 1}
        assert await replica.apply_change(change(2, "b")) == "applied"
        assert await replica.apply_change(change(3, "c")) == "applied"
        assert [e.key for e in await replica.all("items")] == ["a", "b", "c"]
        assert await replica.cursors() == {"global": 3}


async def test_reported_cursors_come_from_memory_after_a_real_time_change(
    tmp_path: Path,
) -> None:
    """A heartbeat's cursors: read from the file until a real-time change has been
    applied (its transaction reads every followed scope's cursor), then from memory; read
    again after a delta moved them."""
    path = tmp_path / "a.db"

    def force_cursor(scope: str, seq: int) -> None:
        # Behind the replica's back, so the test sees which source answered.
        with sqlite3.connect(path) as db:
            db.execute(
                "INSERT INTO catalog_cursors (scope, seq) VALUES (?, ?) "
                "ON CONFLICT (scope) DO UPDATE SET seq = excluded.seq",
                (scope, seq),
            )

    async with open_replica(path) as (_, replica, _):
        force_cursor(CENTER, 3)
        assert await replica.reported_cursors() == {CENTER: 3}  # the file
        force_cursor(CENTER, 4)
        assert await replica.apply_change(change(1, "a")) == "applied"
        force_cursor("global", 7)
        force_cursor(CENTER, 9)
        # The global change's transaction read the center's cursor (4) too.
        assert await replica.reported_cursors() == {"global": 1, CENTER: 4}  # memory
        assert await replica.cursors() == {"global": 7, CENTER: 9}  # the file
        force_cursor("global", 1)
        force_cursor(CENTER, 4)
        assert await replica.apply_change(change(5, "p", scope=CENTER)) == "applied"
        assert await replica.apply_change(change(2, "b")) == "applied"
        assert await replica.reported_cursors() == await replica.cursors()
        assert await replica.reported_cursors() == {"global": 2, CENTER: 5}

        request_id = new_request_id()
        await stage_all(replica, [change(5, "c")], request_id)
        await replica.apply_staged(
            request_id, mode="delta", entities=ENTITIES, cursors={"global": 5, CENTER: 6}
        )
        force_cursor(CENTER, 8)
        assert await replica.reported_cursors() == {"global": 5, CENTER: 8}  # the file again


async def test_an_older_change_never_rolls_a_newer_row_back(tmp_path: Path) -> None:
    async with open_replica(tmp_path / "a.db") as (_, replica, _):
        # A partial reinit (cursors stay) brought i-1 as of scope_seq 5 ...
        request_id = new_request_id()
        await stage_all(replica, [change(5, "i-1", item_state("new"), version=3)], request_id)
        await replica.apply_staged(request_id, mode="update", entities=["items"], cursors=None)
        assert await replica.cursors() == {}
        # ... then the real-time changes 1..5 arrive: the cursor advances, the row stays.
        for seq in range(1, 5):
            assert await replica.apply_change(change(seq, "i-1", item_state("old"))) == "applied"
        assert (await state_of(replica, "i-1"))["name"] == "new"
        assert await replica.apply_change(change(5, "i-1", item_state("new"), version=3)) == (
            "applied"
        )
        assert await replica.apply_change(change(6, "i-1", op="delete", version=4)) == "applied"
        assert await replica.item("i-1") is None


async def test_reinit_update_upserts_and_deletes_nothing(tmp_path: Path) -> None:
    async with open_replica(tmp_path / "a.db") as (_, replica, _):
        await replica.apply_change(change(1, "gone-at-central"))
        await replica.apply_change(change(2, "a", item_state("a-old")))
        request_id = new_request_id()
        await stage_all(replica, [change(3, "a", item_state("a-new"), version=2)], request_id)
        applied = await replica.apply_staged(
            request_id, mode="update", entities=ENTITIES, cursors={"global": 3}
        )
        assert applied.applied == 1
        assert [e.key for e in await replica.all("items")] == ["a", "gone-at-central"]


async def replace_catalog(replica: Replica, n: int, name: str, seq: int) -> str:
    request_id = new_request_id()
    changes = [
        change(seq, f"i-{k:05}", item_state(f"{name} {k}", barcodes=[f"b{k}"])) for k in range(n)
    ]
    await stage_all(replica, changes, request_id, size=500, mode="replace")
    return request_id


async def test_replace_swaps_the_entities_in_one_transaction(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db) as (_, replica, _):
        await replica.apply_change(change(1, "stale", item_state(barcodes=["stale"])))
        await replica.apply_change(
            change(1, "cust-1", {"name": "Jana"}, entity="customers", scope=CENTER)
        )
        request_id = await replace_catalog(replica, 1200, "fresh", 7)
        applied = await replica.apply_staged(
            request_id, mode="replace", entities=["items"], cursors=None
        )
        assert applied.applied == 1200
        keys = catalog_keys(db)
        assert len(keys) == 1200
        assert "stale" not in keys
        assert await replica.item_by_barcode("stale") is None
        assert await barcode_owner(replica, "b1199") == "i-01199"
        # Entities outside the replaced set are untouched.
        assert await replica.get("customers", "cust-1") is not None


async def test_replace_failing_midway_leaves_the_old_catalog_and_a_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db) as (_, replica, _):
        for k in range(10):
            await replica.apply_change(change(k + 1, f"old-{k}", item_state(barcodes=[f"o{k}"])))
        request_id = await replace_catalog(replica, 1000, "new", 20)
        real_execute = aiosqlite.Connection.execute

        def failing_execute(self: aiosqlite.Connection, sql: str, *args: Any) -> Any:
            # Fail after the old rows are deleted and the new ones inserted, mid-swap.
            if sql.startswith("DELETE FROM item_barcodes"):
                raise sqlite3.OperationalError("simulated crash during the swap")
            return real_execute(self, sql, *args)

        monkeypatch.setattr(aiosqlite.Connection, "execute", failing_execute)
        with pytest.raises(sqlite3.OperationalError):
            await replica.apply_staged(
                request_id, mode="replace", entities=list(ENTITIES), cursors={"global": 20}
            )
        monkeypatch.undo()
        assert catalog_keys(db) == [f"old-{k}" for k in range(10)]
        assert await barcode_owner(replica, "o3") == "old-3"
        assert await replica.cursors() == {"global": 10}
        # The rerun: a new request, staged from scratch.
        request_id = await replace_catalog(replica, 1000, "new", 20)
        await replica.apply_staged(
            request_id, mode="replace", entities=list(ENTITIES), cursors={"global": 20}
        )
        assert len(catalog_keys(db)) == 1000
        assert await replica.item_by_barcode("o3") is None
        assert await replica.cursors() == {"global": 20}


_KILLED_REPLACE = textwrap.dedent(
    """
    import asyncio, sys, uuid
    from pathlib import Path
    from tillsync_agent import replica as replica_module
    from tillsync_agent.replica import Replica
    from tillsync_agent.store import Store
    from tillsync_protocol import ENTITIES, CatalogChangeBody, DeltaPageBody

    async def main() -> None:
        path = Path(sys.argv[1])
        async with Store(path) as store:
            replica = Replica(store, path=path, center_id="c-1")
            await replica.open()
            request_id = str(uuid.uuid4())
            await replica.begin_staging(request_id, "replace")
            for page_no in range(1, 6):
                changes = [
                    CatalogChangeBody(scope="global", scope_seq=100, entity="items",
                        key=f"new-{page_no}-{k}", op="upsert", version=1,
                        state={"name": "new", "barcodes": [f"n{page_no}-{k}"]})
                    for k in range(400)
                ]
                await replica.stage(request_id, DeltaPageBody(
                    request_id=request_id, page_no=page_no, changes=changes))
            real = replica_module._sync_barcodes
            swap = Replica._swap

            async def slow_swap(self, db, entities, staging):
                result = await swap(self, db, entities, staging)
                print("swapped-uncommitted", flush=True)
                await asyncio.sleep(60)  # killed here, before COMMIT
                return result

            Replica._swap = slow_swap
            await replica.apply_staged(request_id, mode="replace", entities=list(ENTITIES),
                                       cursors={"global": 100})

    asyncio.run(main())
    """
)


async def test_replace_killed_before_its_commit_leaves_the_old_catalog(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db) as (_, replica, _):
        for k in range(5):
            await replica.apply_change(change(k + 1, f"old-{k}", item_state(barcodes=[f"o{k}"])))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _KILLED_REPLACE, str(db), stdout=subprocess.PIPE
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=60)
    assert line.strip() == b"swapped-uncommitted"
    os.kill(process.pid, signal.SIGKILL)
    await process.wait()
    assert catalog_keys(db) == [f"old-{k}" for k in range(5)]
    async with open_replica(db) as (_, replica, _):
        assert await replica.cursors() == {"global": 5}
        assert await barcode_owner(replica, "o4") == "old-4"
        # The rerun starts by clearing what the killed run staged, then completes.
        request_id = await replace_catalog(replica, 50, "rerun", 100)
        await replica.apply_staged(
            request_id, mode="replace", entities=list(ENTITIES), cursors={"global": 100}
        )
    assert len(catalog_keys(db)) == 50
    assert staged_rows(db) == 0


async def test_subscribers_get_committed_changes_and_a_slow_one_loses_the_oldest(
    tmp_path: Path,
) -> None:
    async with open_replica(tmp_path / "a.db", queue_size=3) as (_, replica, _):
        seen: list[CatalogEvent] = []
        unsubscribe = replica.on_change(seen.append)
        fast = replica.subscribe(maxsize=100)
        slow = replica.subscribe()
        for seq in range(1, 6):
            await replica.apply_change(change(seq, f"i-{seq}"))
        await replica.apply_change(change(6, "i-1", op="delete", version=2))
        unsubscribe()
        await replica.apply_change(change(7, "i-7"))
        assert [(e.key, e.op) for e in seen] == [
            ("i-1", "upsert"),
            ("i-2", "upsert"),
            ("i-3", "upsert"),
            ("i-4", "upsert"),
            ("i-5", "upsert"),
            ("i-1", "delete"),
        ]
        got = [await anext(fast) for _ in range(7)]
        assert [e.key for e in got][-2:] == ["i-1", "i-7"]
        assert all(e.source == "change" for e in got)
        assert slow.dropped == 4
        assert [(await anext(slow)).key for _ in range(3)] == ["i-5", "i-1", "i-7"]

        async def drain() -> list[str | None]:
            return [e.key async for e in fast]

        reader = asyncio.create_task(drain())
        await asyncio.sleep(0)
        await replica.apply_change(change(8, "i-8"))
        fast.close()
        assert await asyncio.wait_for(reader, 5) == ["i-8"]


async def test_edit_item_writes_replica_and_outbox_in_one_transaction(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db) as (_, replica, outbox):
        await replica.apply_change(
            change(1, "i-1", item_state(price=100, barcodes=["1"]), version=4)
        )
        events = replica.subscribe()
        submitted = await replica.edit_item(outbox, "i-1", {"gross_price": 120, "barcodes": ["2"]})
        assert submitted.doc_type == "item_edit"
        assert submitted.seq == 1
        item = await replica.item("i-1")
        assert item is not None
        assert item.local_edit
        assert item.version == 4
        assert item.state["gross_price"] == 120
        assert item.state["name"] == "Rohlík"
        assert await barcode_owner(replica, "2") == "i-1"
        assert await replica.item_by_barcode("1") is None
        assert (await anext(events)).source == "local_edit"
        assert outbox.counts.pending == 1
        (row,) = await outbox.due(10)
        document = decode_document(row.payload)
        assert isinstance(document, ItemEdit)
        assert document.body.model_dump() == {
            "item_id": "i-1",
            "base_version": 4,
            "changes": {
                "name": None,
                "gross_price": 120,
                "currency": None,
                "tax_rate_id": None,
                "category_id": None,
                "barcodes": ["2"],
                "labels": None,
                "active": None,
            },
        }
        # Invalid changes and unknown items write nothing, in either table.
        with pytest.raises(FloatNotAllowedError):
            await replica.edit_item(outbox, "i-1", {"gross_price": 1.5})  # type: ignore[dict-item]
        with pytest.raises(InvalidValueError):
            await replica.edit_item(outbox, "i-1", {})
        with pytest.raises(UnknownItemError) as raised:
            await replica.edit_item(outbox, "nope", {"name": "x"})
        assert raised.value.code == "unknown_item"
        assert outbox.counts.pending == 1
        assert outbox.counts.last_seq == 1
        assert (await state_of(replica, "i-1"))["gross_price"] == 120
        # Central's next change of the item clears the flag.
        await replica.apply_change(change(2, "i-1", item_state(price=125), version=5))
        item = await replica.item("i-1")
        assert item is not None
        assert not item.local_edit
        assert item.state["gross_price"] == 125
    assert rows(db, "SELECT seq, doc_type FROM outbox") == [(1, "item_edit")]


async def test_edit_item_rolls_back_both_when_the_outbox_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with open_replica(tmp_path / "a.db") as (_, replica, outbox):
        await replica.apply_change(change(1, "i-1", item_state(price=100)))
        monkeypatch.setattr("tillsync_agent.outbox._ADD_COUNTER", "UPDATE nonexistent SET x = 1")
        with pytest.raises(sqlite3.OperationalError):
            await replica.edit_item(outbox, "i-1", {"gross_price": 120})
        monkeypatch.undo()
        item = await replica.item("i-1")
        assert item is not None
        assert not item.local_edit
        assert item.state["gross_price"] == 100
        assert await outbox.due(10) == []
        assert outbox.counts.last_seq == 0


async def test_changes_applied_together_end_as_if_applied_one_by_one(tmp_path: Path) -> None:
    burst = [
        change(1, "a", item_state("a", barcodes=["1"])),
        change(2, "b", item_state("b", barcodes=["2"])),
        change(2, "b", item_state("b-again")),  # duplicate
        change(4, "d"),  # gap: nothing written, the cursor stays
        change(1, "x", scope="c-2"),  # a scope this register does not follow
        change(3, "c", item_state("c", barcodes=["1"])),  # takes barcode 1 from a
        change(4, "d"),
        change(1, "p", entity="taxes", scope=CENTER),
        change(5, "a", op="delete", version=2),
        change(6, "f", item_state("f", labels=["fuel"])),  # not kept (labels)
    ]
    tables = ("catalog", "catalog_cursors", "item_barcodes")
    results = []
    for together in (True, False):
        db = tmp_path / f"{together}.db"
        async with open_replica(db, labels=["bistro"]) as (_, replica, _):
            events: list[CatalogEvent] = []
            replica.on_change(events.append)
            if together:
                statuses = await replica.apply_changes(burst)
            else:
                statuses = [await replica.apply_change(c) for c in burst]
        contents = [rows(db, f"SELECT * FROM {table} ORDER BY 1, 2") for table in tables]
        results.append((statuses, events, contents))
    assert results[0] == results[1]
    statuses, events, contents = results[0]
    assert statuses == [
        "applied", "applied", "duplicate", "gap", "ignored",
        "applied", "applied", "applied", "applied", "applied",
    ]  # fmt: skip
    assert [(e.key, e.op) for e in events] == [
        ("a", "upsert"), ("b", "upsert"), ("c", "upsert"), ("d", "upsert"), ("p", "upsert"),
        ("a", "delete"),
    ]  # fmt: skip
    assert contents[2] == [("1", "c"), ("2", "b")]


@pytest.mark.parametrize("mode", ["delta", "replace"])
async def test_a_key_that_comes_twice_in_one_answer_ends_at_its_latest_change(
    tmp_path: Path, mode: ApplyMode
) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db) as (_, replica, _):
        request_id = new_request_id()
        answer = [
            change(1, "a", item_state("a-first", barcodes=["1"])),
            change(2, "b"),
            change(3, "a", item_state("a-latest", barcodes=["3"]), version=2),
        ]
        await stage_all(replica, answer, request_id, mode=mode)
        applied = await replica.apply_staged(
            request_id, mode=mode, entities=ENTITIES, cursors={"global": 3, CENTER: 0}
        )
        assert applied.received == 2
        assert (await state_of(replica, "a"))["name"] == "a-latest"
        assert [e.key for e in await replica.all("items")] == ["a", "b"]
        assert await barcode_owner(replica, "3") == "a"
        assert await replica.item_by_barcode("1") is None
    assert staged_rows(db) == 0
