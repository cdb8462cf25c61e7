"""The catalog RPC worker against real PostgreSQL and RabbitMQ, asked by enrolled
registers over their own broker users: deltas, snapshots, filters, paging, refusals."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgpack
import pytest
from catalog_client import Requester

from conftest import Enroll, new_id
from tillsync_central import catalog_rpc
from tillsync_central.catalog import CatalogEditor, prepare_edit
from tillsync_central.catalog_rpc import CatalogRpcWorker, _pack_change, _page_bytes
from tillsync_central.settings import CentralSettings
from tillsync_protocol import CatalogChangeBody, DeltaPage, DeltaPageBody, decode_control, encode


def item(name: str, price: int = 100) -> dict[str, Any]:
    return {"name": name, "gross_price": price, "currency": "CZK", "tax_rate_id": "t"}


@pytest.fixture
async def rpc(
    settings: CentralSettings, pool: asyncpg.Pool, declared: None
) -> AsyncIterator[CatalogRpcWorker]:
    worker = CatalogRpcWorker(settings, pool)
    stopping = asyncio.Event()
    task = asyncio.create_task(worker.run(stopping))
    await asyncio.wait_for(worker.connected.wait(), 20)
    yield worker
    stopping.set()
    await asyncio.wait_for(task, 20)


def _summary(changes: list[Any]) -> list[tuple[str, str, str, str, int]]:
    return [(c.scope, c.entity, c.key, c.op, c.version) for c in changes]


async def test_a_delta_has_the_latest_state_of_each_changed_key_with_tombstones(
    enroll: Enroll, pool: asyncpg.Pool, rpc: CatalogRpcWorker
) -> None:
    enrollment = await enroll()
    center = enrollment.center_id
    editor = CatalogEditor(pool)
    for key in ("a", "b", "c"):
        await editor.upsert("global", "items", key, item(key))
    await editor.upsert(center, "stock_levels", "a", {"qty_milli": 1000})
    # The register is at global 3, center 1. Then:
    await editor.upsert("global", "items", "a", item("a", 200))
    await editor.upsert("global", "items", "a", item("a", 300))
    await editor.delete("global", "items", "b")
    await editor.upsert("global", "items", "d", item("d"))
    await editor.upsert(center, "stock_levels", "a", {"qty_milli": 500})

    async with Requester(enrollment) as register:
        answer = await register.ask(cursors={"global": 3, center: 1})
        assert _summary(answer.changes) == [
            ("global", "items", "a", "upsert", 3),
            ("global", "items", "b", "delete", 2),
            ("global", "items", "d", "upsert", 1),
            (center, "stock_levels", "a", "upsert", 2),
        ]
        assert answer.changes[0].state["gross_price"] == 300
        assert answer.changes[1].state is None
        assert [c.scope_seq for c in answer.changes] == [5, 6, 7, 2]
        end = answer.end.body
        assert (end.pages, end.changes, end.cursors) == (1, 4, {"global": 7, center: 2})
        assert end.error_code is None

        # At the new cursors: nothing new, and the same cursors back.
        again = await register.ask(cursors=end.cursors)
        assert again.pages == []
        assert (again.end.body.changes, again.end.body.cursors) == (0, end.cursors)

        # No cursors at all: everything each scope ever had, tombstones included.
        fresh = await register.ask()
        assert len(fresh.changes) == 5


async def test_snapshots_with_and_without_customers_and_an_entities_filter(
    enroll: Enroll, pool: asyncpg.Pool, rpc: CatalogRpcWorker
) -> None:
    enrollment = await enroll()
    center = enrollment.center_id
    other = (await enroll()).center_id
    editor = CatalogEditor(pool)
    await editor.apply(
        [
            prepare_edit("global", "items", "a", state=item("a")),
            prepare_edit("global", "items", "b", state=item("b")),
            prepare_edit("global", "items", "gone", state=item("gone")),
            prepare_edit("global", "customers", "k1", state={"name": "Jana"}),
            prepare_edit("global", "loyalty_balances", "k1", state={"points": 10}),
            prepare_edit("global", "taxes", "t", state={"name": "VAT", "rate_bp": 2100}),
            prepare_edit(center, "prices", "a", state={"gross_price": 90, "currency": "CZK"}),
            prepare_edit(other, "prices", "a", state={"gross_price": 80, "currency": "CZK"}),
        ]
    )
    await editor.delete("global", "items", "gone")

    async with Requester(enrollment) as register:
        full = await register.ask(mode="snapshot", cursors={"global": 2})
        keys = {(c.scope, c.entity, c.key) for c in full.changes}
        assert keys == {
            ("global", "items", "a"),
            ("global", "items", "b"),
            ("global", "customers", "k1"),
            ("global", "loyalty_balances", "k1"),
            ("global", "taxes", "t"),
            (center, "prices", "a"),
        }
        assert all(c.op == "upsert" for c in full.changes)
        assert full.end.body.cursors == {"global": 7, center: 1}

        without = await register.ask(mode="snapshot", with_customers=False)
        assert {c.entity for c in without.changes} == {"items", "taxes", "prices"}

        only = await register.ask(mode="snapshot", entities=["items", "customers"])
        assert {(c.entity, c.key) for c in only.changes} == {
            ("items", "a"),
            ("items", "b"),
            ("customers", "k1"),
        }
        only_items = await register.ask(entities=["items", "customers"], with_customers=False)
        assert {c.entity for c in only_items.changes} == {"items"}


async def test_large_answers_come_in_pages(
    enroll: Enroll, pool: asyncpg.Pool, rpc: CatalogRpcWorker
) -> None:
    enrollment = await enroll()
    await CatalogEditor(pool).apply(
        [prepare_edit("global", "items", f"i{n:03d}", state=item(f"i{n}")) for n in range(25)]
    )
    async with Requester(enrollment) as register:
        answer = await register.ask(mode="snapshot", page_size=10)
    assert [p.body.page_no for p in answer.pages] == [1, 2, 3]
    assert [len(p.body.changes) for p in answer.pages] == [10, 10, 5]
    assert [c.scope_seq for c in answer.changes] == list(range(1, 26))
    assert (answer.end.body.pages, answer.end.body.changes) == (3, 25)


async def _dead_letters(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch("SELECT * FROM dead_letters WHERE source = 'rpc' ORDER BY id")


async def test_a_request_for_another_register_is_refused_to_its_sender(
    enroll: Enroll, pool: asyncpg.Pool, rpc: CatalogRpcWorker
) -> None:
    center = new_id("c")
    mallory, victim = await enroll(center), await enroll(center)
    await CatalogEditor(pool).upsert("global", "items", "a", item("a"))
    async with Requester(mallory) as bad, Requester(victim) as other:
        raw = bad.request(register_id=victim.register_id)
        answer = await bad.answer(await bad.publish(raw))
        assert answer.pages == []
        assert answer.end.body.error_code == "identity_mismatch"
        assert victim.register_id in (answer.end.body.error_reason or "")
        await asyncio.sleep(0.3)
        assert other.inbox.received == []  # the body never decides who gets an answer
    letters = await _dead_letters(pool)
    assert [(r["code"], r["field"], r["user_id"]) for r in letters] == [
        ("identity_mismatch", "body.register_id", mallory.broker_user)
    ]


@pytest.mark.parametrize(
    ("cursors", "code", "field"),
    [
        ({"global": 99}, "cursor_ahead", "body.cursors.global"),
        ({"somewhere-else": 0}, "unknown_scope", "body.cursors.somewhere-else"),
    ],
)
async def test_impossible_cursors_are_answered_with_an_error(
    enroll: Enroll,
    pool: asyncpg.Pool,
    rpc: CatalogRpcWorker,
    cursors: dict[str, int],
    code: str,
    field: str,
) -> None:
    enrollment = await enroll()
    await CatalogEditor(pool).upsert("global", "items", "a", item("a"))
    async with Requester(enrollment) as register:
        answer = await register.ask(cursors=cursors)
    end = answer.end.body
    assert (end.error_code, end.pages, end.changes, end.cursors) == (code, 0, 0, cursors)
    letters = await _dead_letters(pool)
    assert [(r["code"], r["field"], r["register_id"]) for r in letters] == [
        (code, field, enrollment.register_id)
    ]
    assert rpc.stats.refused == 1


def test_a_page_packed_change_by_change_is_byte_for_byte_the_models_encoding() -> None:
    rows = [
        {"scope_seq": 7, "entity": "items", "key": "a", "deleted": False, "version": 3,
         "state": {"name": "Å", "gross_price": 120, "barcodes": ["1", "2"], "x": {"y": None}}},
        {"scope_seq": 9, "entity": "items", "key": "b", "deleted": True, "version": 4,
         "state": None},
    ]  # fmt: skip
    # The queries read the state as text (jsonb's, ", " and ": " between items).
    read = [
        {**row, "state": None if row["state"] is None else json.dumps(row["state"])} for row in rows
    ]
    request_id, msg_id = str(uuid.uuid4()), str(uuid.uuid4())
    data = _page_bytes(request_id, 2, msg_id, [_pack_change("global", row) for row in read])
    page = decode_control(data)
    assert isinstance(page, DeltaPage)
    expected = DeltaPage(
        msg_id=msg_id,
        created_at=page.created_at,
        body=DeltaPageBody(
            request_id=request_id,
            page_no=2,
            changes=[
                CatalogChangeBody(
                    scope="global",
                    scope_seq=row["scope_seq"],
                    entity=row["entity"],
                    key=row["key"],
                    op="delete" if row["deleted"] else "upsert",
                    version=row["version"],
                    state=row["state"],
                )
                for row in rows
            ],
        ),
    )
    assert data == encode(expected)


async def test_pages_are_cut_by_size_and_arrive_in_order(
    enroll: Enroll, pool: asyncpg.Pool, rpc: CatalogRpcWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many small pages, several awaiting their confirm at once: they still arrive in order.
    monkeypatch.setattr(catalog_rpc, "PAGE_MAX_BYTES", 300)
    enrollment = await enroll()
    await CatalogEditor(pool).apply(
        [prepare_edit("global", "items", f"i{n:03d}", state=item(f"i{n}")) for n in range(40)]
    )
    async with Requester(enrollment) as register:
        answer = await register.ask(mode="snapshot", page_size=1000)
    assert [p.body.page_no for p in answer.pages] == list(range(1, len(answer.pages) + 1))
    assert len(answer.pages) > 10
    for page in answer.pages:
        packed = [msgpack.packb(c.model_dump(), use_bin_type=True) for c in page.body.changes]
        assert len(packed) == 1 or sum(len(p) for p in packed) <= 300
    assert [c.key for c in answer.changes] == [f"i{n:03d}" for n in range(40)]
    assert (answer.end.body.pages, answer.end.body.changes) == (len(answer.pages), 40)
