"""How a delta or reinit is staged in the replica's SQLite file: the schema upgrade of a
database an older agent left, the replace staged as the next catalog itself (its barcodes,
its deletes and label-filtered rows), the one request staged at a time, and the JSON text
of the states."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tillsync_agent import load_settings
from tillsync_agent.delta_rpc import DeltaRpc
from tillsync_agent.replica import _BARCODES_ALL, NotStagedError, _json
from tillsync_agent.store import SCHEMA_VERSION, Store
from tillsync_protocol import ENTITIES, GLOBAL_SCOPE, ConfigError, DeltaPage

from .catalog import CENTER, change, item_state, new_request_id, open_replica, pages
from .documents import receipt

# The staging tables of schema version 2 (the agent before this one), verbatim.
_V2_SHADOW = """
CREATE TABLE catalog_shadow (
    request_id TEXT    NOT NULL,
    page_no    INTEGER NOT NULL,
    idx        INTEGER NOT NULL,
    entity     TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    scope      TEXT    NOT NULL,
    op         TEXT    NOT NULL CHECK (op IN ('upsert', 'delete')),
    version    INTEGER NOT NULL,
    scope_seq  INTEGER NOT NULL,
    state      TEXT,
    kept       INTEGER NOT NULL CHECK (kept IN (0, 1)),  -- 0: filtered out by labels
    PRIMARY KEY (request_id, page_no, idx)
);
CREATE INDEX catalog_shadow_key
    ON catalog_shadow (request_id, entity, key, scope, scope_seq);
"""
_V3_ONLY = ("catalog_staging", "catalog_next", "item_barcodes_next", "catalog_next_drops")


def query(path: Path, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql, params).fetchall()


def columns(path: Path, table: str) -> list[str]:
    return [str(row[1]) for row in query(path, f"PRAGMA table_info({table})")]


def make_v2_database(path: Path) -> None:
    """A database as the version-2 agent left it after a reinit killed while staging: two
    items, one document in the outbox, a page of the shadow."""
    with sqlite3.connect(path) as db:
        db.executescript(
            "".join(f"DROP TABLE {t};" for t in (*_V3_ONLY, "catalog_shadow"))
            + _V2_SHADOW
            + "PRAGMA user_version = 2;"
        )
        db.execute(
            "INSERT INTO catalog_shadow VALUES ('r-old', 1, 0, 'items', 'x', 'global', "
            "'upsert', 1, 9, '{}', 1)"
        )


async def seed(path: Path) -> None:
    async with open_replica(path) as (_, replica, outbox):
        await replica.apply_change(change(1, "old-1", item_state("Old 1", barcodes=["o1"])))
        await replica.apply_change(change(2, "old-2", item_state("Old 2", barcodes=["o2"])))
        await outbox.submit("receipt", receipt())


async def test_a_version_2_database_is_upgraded_keeping_catalog_and_outbox(
    tmp_path: Path,
) -> None:
    db = tmp_path / "a.db"
    await seed(db)
    make_v2_database(db)
    assert "request_id" in columns(db, "catalog_shadow")
    catalog_before = query(db, "SELECT * FROM catalog ORDER BY key")
    outbox_before = query(db, "SELECT seq, doc_id, payload FROM outbox")

    async with open_replica(db) as (_, replica, outbox):
        assert query(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)] == [(3,)]
        assert "request_id" not in columns(db, "catalog_shadow")
        assert query(db, "SELECT COUNT(*) FROM catalog_shadow") == [(0,)]  # the leftover
        assert all(columns(db, t) for t in _V3_ONLY)
        assert columns(db, "catalog_next") == columns(db, "catalog")
        assert query(db, "SELECT * FROM catalog ORDER BY key") == catalog_before
        assert query(db, "SELECT seq, doc_id, payload FROM outbox") == outbox_before
        assert outbox.counts.pending == 1
        assert await replica.cursors() == {"global": 2}
        # Both kinds of staging work on the upgraded file.
        request_id = new_request_id()
        await replica.begin_staging(request_id, "delta")
        for page in pages([change(3, "new-3")], 1, request_id):
            await replica.stage(request_id, page)
        await replica.apply_staged(request_id, mode="delta", entities=ENTITIES, cursors=None)
        request_id = new_request_id()
        await replica.begin_staging(request_id, "replace")
        for page in pages([change(4, "only", item_state(barcodes=["b"]))], 1, request_id):
            await replica.stage(request_id, page)
        await replica.apply_staged(
            request_id, mode="replace", entities=ENTITIES, cursors={"global": 4}
        )
        assert [e.key for e in await replica.all("items")] == ["only"]
        assert (await replica.item_by_barcode("b")) is not None
        assert await replica.item_by_barcode("o1") is None
    # Opening it again changes nothing more.
    async with Store(db):
        pass
    assert query(db, "SELECT key FROM catalog") == [("only",)]


async def test_a_database_of_a_newer_agent_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    async with Store(db):
        pass
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError) as raised:
        async with Store(db):
            pass
    assert raised.value.field == "data_dir"
    assert f"schema version {SCHEMA_VERSION + 1}" in str(raised.value)


def expected_barcodes(path: Path) -> list[tuple[Any, ...]]:
    """What the full rebuild from the items' states gives (the reference)."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TEMP TABLE ref (barcode TEXT PRIMARY KEY, item_key TEXT NOT NULL)")
        db.execute(_BARCODES_ALL.replace("INTO item_barcodes", "INTO temp.ref"))
        return db.execute("SELECT barcode, item_key FROM temp.ref ORDER BY barcode").fetchall()


def item_barcodes(path: Path) -> list[tuple[Any, ...]]:
    return query(path, "SELECT barcode, item_key FROM item_barcodes ORDER BY barcode")


@pytest.mark.parametrize("seed_", range(4))
async def test_staged_barcodes_of_a_replace_equal_the_rebuild_from_the_states(
    tmp_path: Path, seed_: int
) -> None:
    """Items of both scopes sharing barcodes (the center's row wins, then the greatest key),
    in any page order; odd shapes of ``barcodes`` as ``json_each`` reads them."""
    rng = random.Random(seed_)
    db = tmp_path / "a.db"
    shapes: list[Any] = [[], "solo", {"a": "in-map", "b": 7}, [1, True, None, ["nested"]]]
    changes = []
    for k in range(300):
        scope = rng.choice([GLOBAL_SCOPE, CENTER])
        barcodes: Any = [f"b{rng.randrange(120)}" for _ in range(rng.randrange(4))]
        if k % 37 == 0:
            barcodes = rng.choice(shapes)
        changes.append(
            change(k + 1, f"i-{rng.randrange(200):03}", item_state(barcodes=barcodes), scope=scope)
        )
    # Each (key, scope) once, as central answers; shuffled across pages.
    unique = list({(c.key, c.scope): c for c in changes}.values())
    rng.shuffle(unique)
    async with open_replica(db) as (_, replica, _):
        request_id = new_request_id()
        await replica.begin_staging(request_id, "replace")
        for page in pages(unique, 17, request_id):
            await replica.stage(request_id, page)
        applied = await replica.apply_staged(
            request_id, mode="replace", entities=ENTITIES, cursors=None
        )
        assert applied.applied == applied.received == len(unique)
    assert item_barcodes(db) == expected_barcodes(db)
    assert len(item_barcodes(db)) > 50


async def test_a_replace_with_labels_and_deletes_keeps_only_what_the_register_keeps(
    tmp_path: Path,
) -> None:
    db = tmp_path / "a.db"
    async with open_replica(db, labels=["bar"]) as (_, replica, _):
        await replica.apply_change(change(1, "old", item_state(barcodes=["o"])))
        request_id = new_request_id()
        answer = [
            change(2, "plain", item_state(barcodes=["p"])),
            change(3, "bar", item_state(labels=["bar"], barcodes=["x"])),
            change(4, "kitchen", item_state(labels=["kitchen"], barcodes=["k"])),
            # A key twice: the latest change (a row filtered out, then a delete) wins.
            change(5, "moved", item_state(barcodes=["m"])),
            change(6, "moved", item_state(labels=["kitchen"], barcodes=["m"])),
            change(7, "gone", item_state(barcodes=["g"])),
            change(8, "gone", op="delete"),
            # An older change staged after a newer one loses.
            change(10, "late", item_state("new", barcodes=["l-new"])),
            change(9, "late", item_state("old", barcodes=["l-old"])),
        ]
        await replica.begin_staging(request_id, "replace")
        for page in pages(answer, 2, request_id):
            await replica.stage(request_id, page)
        applied = await replica.apply_staged(
            request_id, mode="replace", entities=["items"], cursors={"global": 10}
        )
        assert [e.key for e in await replica.all("items")] == ["bar", "late", "plain"]
        assert (await replica.item("late")) is not None
        assert applied.applied == 3
        assert applied.received == 6  # plain, bar, kitchen, moved, gone, late
    assert (
        item_barcodes(db)
        == expected_barcodes(db)
        == [
            ("l-new", "late"),
            ("p", "plain"),
            ("x", "bar"),
        ]
    )


async def test_only_the_request_being_staged_can_be_staged_and_applied(tmp_path: Path) -> None:
    async with open_replica(tmp_path / "a.db") as (_, replica, _):
        first, second = new_request_id(), new_request_id()
        (page,) = pages([change(1, "a")], 1, first)
        with pytest.raises(NotStagedError):  # nothing begun
            await replica.stage(first, page)
        await replica.begin_staging(first, "replace")
        await replica.stage(first, page)
        await replica.begin_staging(second, "delta")  # clears what `first` staged
        with pytest.raises(NotStagedError) as raised:
            await replica.stage(first, page)
        assert raised.value.code == "not_staged"
        assert raised.value.field == "request_id"
        with pytest.raises(NotStagedError):
            await replica.apply_staged(first, mode="replace", entities=ENTITIES, cursors=None)
        with pytest.raises(NotStagedError):  # staged as a delta, applied as a replace
            await replica.apply_staged(second, mode="replace", entities=ENTITIES, cursors=None)
        applied = await replica.apply_staged(second, mode="update", entities=ENTITIES, cursors=None)
        assert applied.received == 0
        assert await replica.all("items") == []


def _catalog_values(depth: int = 3) -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.text()
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    )


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.dictionaries(st.text(), _catalog_values(), max_size=6))
def test_state_json_is_the_text_json_dumps_gives(state: dict[str, Any]) -> None:
    assert _json(state) == json.dumps(state, ensure_ascii=False, separators=(",", ":"))
    assert json.loads(_json(state)) == state


async def test_a_page_of_a_request_not_being_staged_is_dropped_not_raised(
    tmp_path: Path,
) -> None:
    """The consumer callback must not fail on it (the message is acked either way)."""
    settings = load_settings(
        None, register_id="r-1", center_id=CENTER, amqp_url="amqp://127.0.0.1/", data_dir=tmp_path
    )
    async with open_replica(tmp_path / "a.db") as (_, replica, _):
        rpc = DeltaRpc(settings, replica, asyncio.Event())
        waiting, staged = new_request_id(), new_request_id()
        replies: asyncio.Queue[Any] = asyncio.Queue()
        rpc._replies[waiting] = replies  # as fetch() registers it
        await replica.begin_staging(staged, "replace")
        (page,) = pages([change(1, "a")], 1, waiting)
        rpc.on_reply(DeltaPage(msg_id=new_request_id(), created_at=0, body=page))
        assert replies.empty()
        await replica.begin_staging(waiting, "replace")
        rpc.on_reply(DeltaPage(msg_id=new_request_id(), created_at=0, body=page))
        assert replies.get_nowait().next_rows[0][1] == "a"
