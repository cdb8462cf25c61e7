"""Catalog import (CSV and JSON lines) and the catalog / reinit commands, against real
PostgreSQL and RabbitMQ: bad rows reported by line with code and field, good rows
applied, 100 000 items in well under a minute."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
from catalog_client import Inbox

from conftest import Enroll
from tillsync_central.catalog_import import import_file
from tillsync_central.settings import CentralSettings
from tillsync_protocol import Reinit, topology

CSV = """key,name,gross_price,currency,tax_rate_id,barcodes,active
bread,Bread,2500,CZK,cz-12,8590001;8590002,true
rolls,Rolls,12.50,CZK,cz-12,,yes
milk,Milk,1990,czk,cz-12,,
,Nameless,100,CZK,cz-12,,
water,,100,CZK,cz-12,,
salt,Salt,900,CZK,cz-12,,maybe
eggs,Eggs,4900,CZK,cz-12,,0,extra
butter,Butter,5900,CZK,cz-12,,false
"""


async def _rows(pool: asyncpg.Pool, entity: str) -> dict[tuple[str, str], dict[str, object]]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT scope, key, state FROM catalog_entities WHERE entity = $1 AND NOT deleted",
            entity,
        )
    return {(r["scope"], r["key"]): r["state"] for r in rows}


async def test_a_csv_with_bad_rows_applies_the_good_ones(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = tmp_path / "items.csv"
    path.write_text(CSV)
    report = await import_file(pool, path, entity="items")

    assert [(e.line, e.code, e.field) for e in report.errors] == [
        (3, "float_not_allowed", "state.gross_price"),
        (4, "invalid_value", "state.currency"),
        (5, "invalid_value", "key"),
        (6, "missing_field", "state.name"),
        (7, "wrong_type", "state.active"),
        (8, "malformed", ""),
    ]
    assert (report.rows, report.changes, report.unchanged) == (8, 2, 0)
    items = await _rows(pool, "items")
    assert set(items) == {("global", "bread"), ("global", "butter")}
    assert items[("global", "bread")]["barcodes"] == ["8590001", "8590002"]
    assert items[("global", "bread")]["gross_price"] == 2500
    assert items[("global", "butter")]["active"] is False

    again = await import_file(pool, path, entity="items")  # nothing new to publish
    assert (again.changes, again.unchanged, len(again.errors)) == (0, 2, 6)


async def test_json_lines_with_scopes_deletes_and_bad_lines(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO centers (center_id, name) VALUES ('praha-1', 'Praha 1')")
    item = {"name": "Bread", "gross_price": 2500, "currency": "CZK", "tax_rate_id": "t"}
    lines = [
        {"entity": "items", "key": "bread", "state": item},
        {"entity": "prices", "key": "bread", "scope": "praha-1",
         "state": {"gross_price": 2400, "currency": "CZK"}},
        "{not json",
        {"entity": "widgets", "key": "x", "state": {}},
        {"entity": "prices", "key": "bread", "scope": "brno-9",
         "state": {"gross_price": 1, "currency": "CZK"}},
        {"entity": "items", "key": "old", "state": item},
        {"entity": "items", "key": "old", "op": "delete"},
        {"entity": "items", "key": "x", "state": item, "colour": "red"},
        {"entity": "exchange_rates", "key": "EUR",
         "state": {"currency": "EUR", "base_currency": "CZK", "rate": 25.1}},
        {"entity": "kits", "key": "k", "state": {"name": "Kit", "components": [
            {"item_id": "bread", "qty_milli": 2000}]}},
    ]  # fmt: skip
    path = tmp_path / "catalog.jsonl"
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    report = await import_file(pool, path)

    assert [(e.line, e.code, e.field) for e in report.errors] == [
        (3, "malformed", ""),
        (4, "invalid_value", "entity"),
        (5, "unknown_scope", "scope"),
        (8, "unknown_field", "colour"),
        (9, "float_not_allowed", "state.rate"),
    ]
    assert report.changes == 5
    assert set(await _rows(pool, "items")) == {("global", "bread")}
    assert await _rows(pool, "prices") == {
        ("praha-1", "bread"): {
            "gross_price": 2400, "currency": "CZK", "valid_from": None, "valid_to": None,
        }
    }  # fmt: skip
    assert set(await _rows(pool, "kits")) == {("global", "k")}


def _cli(settings: CentralSettings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "TILLSYNC_AMQP_URL": settings.amqp_url.get_secret_value(),
        "TILLSYNC_DATABASE_URL": settings.database_url.get_secret_value(),
        "TILLSYNC_RABBITMQ_API_URL": settings.rabbitmq_api_url.get_secret_value(),
        "COLUMNS": "200",
    }
    env.pop("TILLSYNC_CONFIG", None)
    command = [str(Path(sys.executable).parent / "tillsync-central"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


async def test_the_import_command_reports_bad_rows_and_exits_1(
    settings: CentralSettings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = tmp_path / "items.csv"
    path.write_text(CSV)
    result = await asyncio.to_thread(_cli, settings, "catalog", "import", str(path), "-e", "items")
    assert result.returncode == 1, result.stderr
    assert "8 rows read: 2 good (2 changed, 0 unchanged), 6 bad" in result.stdout
    assert "float_not_allowed" in result.stderr
    assert "state.gross_price" in result.stderr

    item = '{"name": "Tea", "gross_price": 3900, "currency": "CZK", "tax_rate_id": "t"}'
    done = await asyncio.to_thread(_cli, settings, "catalog", "set", "items", "tea", item)
    assert done.returncode == 0, done.stderr
    assert "upsert items tea in global: scope_seq 3, version 1" in done.stdout
    gone = await asyncio.to_thread(_cli, settings, "catalog", "delete", "items", "tea")
    assert "delete items tea in global: scope_seq 4, version 2" in gone.stdout
    bad = await asyncio.to_thread(
        _cli, settings, "catalog", "set", "items", "tea", item, "--scope", "nowhere"
    )
    assert bad.returncode == 1
    assert "code=unknown_scope field=scope" in bad.stderr


async def test_the_reinit_command_reaches_the_registers_queue(
    settings: CentralSettings, enroll: Enroll
) -> None:
    enrollment = await enroll()
    queue = topology.register_queue(enrollment.register_id)
    async with Inbox(settings.amqp_url.get_secret_value(), queue) as inbox:
        result = await asyncio.to_thread(
            _cli, settings, "reinit", "--center", enrollment.center_id, "--mode", "replace",
            "--without-customers", "--entities", "items,prices",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"reinit (replace) sent to {enrollment.register_id}" in result.stdout
        await inbox.wait(lambda i: len(i.received) >= 1, timeout=10)
    command = inbox.received[0]
    assert isinstance(command.message, Reinit)
    assert command.routing_key == f"reg.{enrollment.register_id}.command"
    body = command.message.body
    assert (body.mode, body.with_customers, body.entities) == (
        "replace",
        False,
        ["items", "prices"],
    )

    refused = await asyncio.to_thread(
        _cli, settings, "reinit", "--register", "nobody", "--mode", "update"
    )
    assert refused.returncode == 1
    assert "code=unknown_register" in refused.stderr


def _write_items(path: Path, count: int) -> None:
    with path.open("w") as file:
        file.write("key,name,gross_price,currency,tax_rate_id,category_id,barcodes,labels\n")
        for n in range(count):
            file.write(f"i{n:06d},Item {n},{100 + n % 5000},CZK,cz-21,cat-{n % 40},"
                       f"859{n:010d},shop;fresh\n")  # fmt: skip


async def test_100_000_items_import_in_well_under_a_minute(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    path = tmp_path / "items.csv"
    _write_items(path, 100_000)
    started = time.monotonic()
    report = await import_file(pool, path, entity="items")
    seconds = time.monotonic() - started
    print(f"imported 100 000 items in {seconds:.1f} s ({report.batches} transactions)")
    assert (report.rows, report.changes, report.errors) == (100_000, 100_000, [])
    assert report.batches == 100
    assert seconds < 30
    async with pool.acquire() as conn:
        assert (
            await conn.fetchval("SELECT last_seq FROM catalog_scopes WHERE scope = 'global'")
            == 100_000
        )
