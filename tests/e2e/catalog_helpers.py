"""Both ends of the catalog for the end-to-end tests: what central holds for a register,
what the register's replica holds, and waiting until the two are the same row for row.

Central's side is read from ``catalog_entities`` (the live rows of ``global`` and the
register's center, filtered by the register's labels as the contract says); the replica's
from the agent's SQLite file, read-only, so the same helpers serve in-process agents and
``tillsync-agent run`` subprocesses. Rows are compared whole: ``(entity, key, scope)`` →
``(version, scope_seq, state)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sqlite3
from collections.abc import AsyncIterator, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import httpx

from e2e.conftest import Central, agent_settings, wait_for
from tillsync_agent import Agent, AgentSettings
from tillsync_agent.store import open_readonly
from tillsync_central.catalog import CatalogEditor, Edit, prepare_edit
from tillsync_central.management import vhost_of
from tillsync_central.provisioning import Enrollment
from tillsync_protocol import CUSTOMER_ENTITIES, topology

RowKey = tuple[str, str, str]
"""``(entity, key, scope)``"""
Row = tuple[int, int, dict[str, Any]]
"""``(version, scope_seq, state)``"""
Rows = dict[RowKey, Row]

_CENTRAL_ROWS = """
SELECT entity, key, scope, version, scope_seq, state FROM catalog_entities
WHERE scope = ANY($1::text[]) AND NOT deleted
"""
_LAST_SEQS = "SELECT scope, last_seq FROM catalog_scopes WHERE scope = ANY($1::text[])"
_REPLICA_ROWS = "SELECT entity, key, scope, version, scope_seq, state, local_edit FROM catalog"


def item(
    name: str,
    price: int = 390,
    *,
    labels: Sequence[str] = (),
    barcodes: Sequence[str] = (),
    **extra: Any,
) -> dict[str, Any]:
    """An item state as central stores it (every field, canonical)."""
    state: dict[str, Any] = {
        "name": name,
        "gross_price": price,
        "currency": "CZK",
        "tax_rate_id": "vat-21",
        "category_id": None,
        "barcodes": list(barcodes),
        "labels": list(labels),
        "active": True,
    }
    state.update(extra)
    return state


def upsert(scope: str, entity: str, key: str, state: dict[str, Any]) -> Edit:
    return prepare_edit(scope, entity, key, "upsert", state)


def delete(scope: str, entity: str, key: str) -> Edit:
    return prepare_edit(scope, entity, key, "delete")


async def edit(
    central: Central, edits: Sequence[Edit], *, batch: int = 500, pause: float = 0
) -> int:
    """Apply ``edits`` through central's editor, ``batch`` per transaction with ``pause``
    seconds between transactions; the changes written."""
    editor = CatalogEditor(central.pool, changed_by="e2e")
    written = 0
    for start in range(0, len(edits), batch):
        if start and pause:
            await asyncio.sleep(pause)  # a pace for the stream, not a wait for a condition
        written += len(await editor.apply(edits[start : start + batch]))
    return written


def churn(n: int, center_id: str, *, seed: int = 5, first_price: int = 10_000) -> list[Edit]:
    """``n`` edits that each write exactly one change: global items created, changed and
    deleted, the center's price overrides and stock levels changed and deleted."""
    rng = random.Random(seed)
    live: set[tuple[str, str, str]] = set()
    edits: list[Edit] = []
    for price in range(first_price, first_price + n):
        if live and rng.random() < 0.15:
            scope, entity, key = sorted(live)[rng.randrange(len(live))]
            live.discard((scope, entity, key))
            edits.append(delete(scope, entity, key))
            continue
        roll = rng.random()
        if roll < 0.6:
            where = ("global", "items", f"k-{rng.randrange(200)}")
            state = item(f"Churn {where[2]}", price, barcodes=[f"20{price}"])
        elif roll < 0.8:
            where = (center_id, "prices", f"i-{rng.randrange(20)}")
            state = {"gross_price": price, "currency": "CZK"}
        else:
            where = (center_id, "stock_levels", f"k-{rng.randrange(100)}")
            state = {"qty_milli": price}
        live.add(where)
        edits.append(upsert(*where, state))
    return edits


def _keeps(labels: Collection[str] | None, entity: str, state: dict[str, Any]) -> bool:
    if labels is None or entity != "items" or not state.get("labels"):
        return True
    return any(label in labels for label in state["labels"])


async def central_rows(
    central: Central,
    center_id: str,
    *,
    labels: Collection[str] | None = None,
    entities: Collection[str] | None = None,
) -> Rows:
    """What a register of ``center_id`` (with ``labels``) should hold: central's live rows
    of ``global`` and the center (only ``entities`` if given)."""
    records = await central.pool.fetch(_CENTRAL_ROWS, ["global", center_id])
    rows: Rows = {}
    for r in records:
        state = json.loads(r["state"])
        if entities is not None and r["entity"] not in entities:
            continue
        if _keeps(labels, r["entity"], state):
            rows[(r["entity"], r["key"], r["scope"])] = (r["version"], r["scope_seq"], state)
    return rows


async def last_seqs(central: Central, center_id: str) -> dict[str, int]:
    records = await central.pool.fetch(_LAST_SEQS, ["global", center_id])
    return {r["scope"]: int(r["last_seq"]) for r in records}


def _read_replica(path: Path) -> tuple[Rows, dict[str, int], int]:
    db = open_readonly(path)
    try:
        rows: Rows = {}
        local_edits = 0
        for entity, key, scope, version, scope_seq, state, local_edit in db.execute(_REPLICA_ROWS):
            rows[(entity, key, scope)] = (version, scope_seq, json.loads(state))
            local_edits += local_edit
        cursors = dict(db.execute("SELECT scope, seq FROM catalog_cursors").fetchall())
        return rows, cursors, local_edits
    finally:
        db.close()


async def replica_rows(settings: AgentSettings) -> Rows:
    """Every row of the register's replica (committed state, read-only)."""
    rows, _, _ = await asyncio.to_thread(_read_replica, settings.database_path)
    return rows


async def replica_cursors(settings: AgentSettings) -> dict[str, int]:
    _, cursors, _ = await asyncio.to_thread(_read_replica, settings.database_path)
    return cursors


def replica_query(settings: AgentSettings, sql: str, *params: object) -> list[tuple[Any, ...]]:
    db = open_readonly(settings.database_path)
    try:
        return db.execute(sql, params).fetchall()
    finally:
        db.close()


def sync_runs(settings: AgentSettings) -> list[dict[str, Any]]:
    """The register's ``sync_runs``, oldest first."""
    rows = replica_query(
        settings, "SELECT id, kind, finished_at, result, errors, detail FROM sync_runs ORDER BY id"
    )
    return [
        {
            "id": id_,
            "kind": kind,
            "finished": finished is not None,
            "result": result,
            "errors": json.loads(errors),
            "detail": json.loads(detail) if detail else {},
        }
        for id_, kind, finished, result, errors, detail in rows
    ]


def tamper(settings: AgentSettings, rows: Rows) -> None:
    """Write ``rows`` into a stopped agent's replica behind its back, as a replica restored
    from another machine or damaged by hand would hold them."""
    db = sqlite3.connect(settings.database_path)
    try:
        with db:
            db.executemany(
                "INSERT OR REPLACE INTO catalog (entity, key, scope, version, scope_seq, state,"
                " local_edit) VALUES (?, ?, ?, ?, ?, ?, 0)",
                [(*k, v[0], v[1], json.dumps(v[2])) for k, v in rows.items()],
            )
    finally:
        db.close()


def set_cursors(settings: AgentSettings, cursors: dict[str, int]) -> None:
    """Move a stopped agent's cursors behind its back (a replica from another central)."""
    db = sqlite3.connect(settings.database_path)
    try:
        with db:
            db.executemany(
                "INSERT OR REPLACE INTO catalog_cursors (scope, seq) VALUES (?, ?)",
                list(cursors.items()),
            )
    finally:
        db.close()


def catalog_runs(settings: AgentSettings) -> list[dict[str, Any]]:
    return [r for r in sync_runs(settings) if r["kind"] in ("catalog_delta", "reinit")]


async def wait_idle(settings: AgentSettings, *, more_than: int, timeout: float = 30) -> None:
    """Until the agent has recorded more than ``more_than`` catalog runs and finished
    them all (``more_than``: how many there were before what is waited for)."""

    seen: list[dict[str, Any]] = []

    async def idle() -> bool:
        seen[:] = await asyncio.to_thread(catalog_runs, settings)
        return len(seen) > more_than and all(r["finished"] for r in seen)

    what = f"more than {more_than} finished catalog syncs"
    try:
        await wait_for(idle, timeout=timeout, what=what)
    except AssertionError as exc:
        summary = [(r["kind"], r["detail"].get("trigger"), r["result"]) for r in seen]
        raise AssertionError(f"{exc}; runs: {summary}") from None


def describe_difference(expected: Rows, actual: Rows, limit: int = 5) -> str:
    missing = sorted(set(expected) - set(actual))
    extra = sorted(set(actual) - set(expected))
    different = sorted(k for k in set(expected) & set(actual) if expected[k] != actual[k])
    parts = [
        f"{len(missing)} missing {missing[:limit]}",
        f"{len(extra)} extra {extra[:limit]}",
        f"{len(different)} different "
        + str([(k, expected[k][:2], actual[k][:2]) for k in different[:limit]]),
    ]
    return "; ".join(parts)


async def wait_converged(
    central: Central,
    settings: AgentSettings,
    *,
    timeout: float = 60,
    labels: Collection[str] | None = None,
) -> Rows:
    """Wait until the replica holds exactly central's rows for it (no local edit left)
    and its cursors are central's ``last_seq``s; returns the rows. On timeout, fails
    naming what differs."""
    center = settings.center_id
    labels = settings.labels if labels is None and settings.labels else labels
    state: dict[str, Any] = {}

    async def same() -> bool:
        # last_seq first: rows read after it are at least as new, so a match is final
        # only if last_seq did not move in between.
        seqs = await last_seqs(central, center)
        expected = await central_rows(central, center, labels=labels)
        rows, cursors, local_edits = await asyncio.to_thread(_read_replica, settings.database_path)
        state.update(expected=expected, rows=rows, cursors=cursors, seqs=seqs)
        return (
            rows == expected
            and cursors == seqs
            and local_edits == 0
            and seqs == await last_seqs(central, center)
        )

    try:
        await wait_for(same, timeout=timeout, what=f"{settings.register_id} to converge")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: cursors {state.get('cursors')} vs last_seq {state.get('seqs')}; rows: "
            + describe_difference(state.get("expected", {}), state.get("rows", {}))
        ) from None
    return dict(state["expected"])


async def provision_many(
    central: Central, center_id: str, register_ids: Iterable[str], *, parallel: int = 8
) -> list[Enrollment]:
    """Enroll registers ``parallel`` at a time (each is a dozen management API calls)."""
    ids = list(register_ids)
    enrollments: list[Enrollment] = []
    for start in range(0, len(ids), parallel):
        chunk = ids[start : start + parallel]
        enrollments += await asyncio.gather(*(central.provision(center_id, r) for r in chunk))
    return enrollments


def fast_settings(enrollment: Enrollment, data_dir: Path, **overrides: Any) -> AgentSettings:
    """Agent settings with catalog timings for tests."""
    values: dict[str, Any] = {"delta_timeout_s": 10.0, "delta_page_size": 500}
    values.update(overrides)
    return agent_settings(enrollment, data_dir, **values)


@contextlib.asynccontextmanager
async def running_agents(settings: Sequence[AgentSettings]) -> AsyncIterator[list[Agent]]:
    """Many in-process agents (no local socket each), stopped like SIGTERM at the end."""
    async with contextlib.AsyncExitStack() as stack:
        agents = [await stack.enter_async_context(Agent(s, serve_socket=False)) for s in settings]
        tasks = [asyncio.create_task(agent.run()) for agent in agents]
        try:
            yield agents
        finally:
            for agent in agents:
                agent.stop()
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)


async def cap_register_queue(central: Central, register_id: str, max_length: int) -> None:
    """Bound one register's queue to ``max_length`` messages by a policy: with both a
    policy and the queue's own ``x-max-length``, RabbitMQ applies the lower; the queue
    keeps its other arguments (``drop-head``) and its bindings."""
    vhost = quote(vhost_of(central.amqp_url), safe="")
    name = quote(f"cap-{register_id}", safe="")
    pattern = "^" + topology.register_queue(register_id).replace(".", r"\.") + "$"
    async with httpx.AsyncClient(
        base_url=central.api.base_url, auth=central.api.auth, timeout=10
    ) as client:
        response = await client.put(
            f"/api/policies/{vhost}/{name}",
            json={
                "pattern": pattern,
                "definition": {"max-length": max_length},
                "apply-to": "queues",
                "priority": 10,
            },
        )
        response.raise_for_status()


async def queue_depth(central: Central, queue: str) -> int:
    """Messages ready in ``queue`` now (a passive declare: exact, unlike the management
    API's statistics, which lag by seconds)."""
    connection = await aio_pika.connect(central.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return int(result.message_count or 0)


def without_customers(rows: Rows) -> Rows:
    return {k: v for k, v in rows.items() if k[0] not in CUSTOMER_ENTITIES}
