"""The admin JSON API's reads and writes against real PostgreSQL and RabbitMQ: the OpenAPI
document against the routes, the fleet (filters, sorting, pagination), documents and
totals, the sync history kept from heartbeats, dead letters replayed through ingest,
queues, the catalog and reinit commands, the live event stream and /metrics."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
from starlette.routing import Route
from tills import Till, canonical, raw_document, receipt_body, until

from services import Services, rabbitmq_api_of
from tillsync_agent.simulator import Till as SimulatedTill
from tillsync_central.admin import AdminServer
from tillsync_central.management import vhost_of
from tillsync_central.runner import IngestService
from tillsync_central.settings import CentralSettings
from tillsync_protocol import topology

from .admin_clients import Clients

Enroll = Any


def _routed(admin: AdminServer) -> set[tuple[str, str]]:
    pairs = set()
    for route in admin.app.routes:
        if isinstance(route, Route) and route.path.startswith("/api/"):
            for method in route.methods or ():
                if method != "HEAD":
                    pairs.add((method.lower(), route.path))
    return pairs


async def test_the_openapi_document_describes_exactly_the_routes(
    admin: AdminServer, clients: Clients
) -> None:
    response = await clients.anonymous.get("/api/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (method, path) for path, operations in document["paths"].items() for method in operations
    }
    assert documented == _routed(admin)
    for path, operations in document["paths"].items():
        names = set(re.findall(r"\{([^}]+)\}", path))
        for method, operation in operations.items():
            in_path = {p["name"] for p in operation["parameters"] if p["in"] == "path"}
            assert in_path == names, (method, path)
            if operation["x-tillsync-role"] is not None:
                assert {"401", "403"} <= set(operation["responses"]), (method, path)
    assert any(isinstance(r, Route) and r.path == "/metrics" for r in admin.app.routes)


async def _fleet_rows(pool: asyncpg.Pool, count: int) -> None:
    """``count`` registers in two centers; even ones heard from now, odd ones 10 min ago."""
    await pool.execute("INSERT INTO centers (center_id, name) VALUES ('c-a', 'A'), ('c-b', 'B')")
    await pool.execute(
        """
        INSERT INTO registers (register_id, center_id, broker_user)
        SELECT format('r-%s', lpad(n::text, 4, '0')), CASE WHEN n % 2 = 0 THEN 'c-a' ELSE 'c-b' END,
               format('reg-r-%s', lpad(n::text, 4, '0'))
        FROM generate_series(1, $1) AS n
        """,
        count,
    )
    await pool.execute(
        """
        INSERT INTO register_presence (register_id, last_seen, sent_at, agent_version, pending,
                                       rejected, acknowledged, last_seq, cursors, heartbeat)
        SELECT register_id,
               now() - CASE WHEN n % 2 = 0 THEN interval '0' ELSE interval '10 min' END,
               now(), '0.1.0', n, 0, 0, n, '{}', '{}'
        FROM (SELECT register_id, right(register_id, 4)::int AS n FROM registers) r
        """
    )


async def test_fleet_filters_sorts_and_pages(clients: Clients, pool: asyncpg.Pool) -> None:
    await _fleet_rows(pool, 250)
    client = clients.viewer
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        page = (await client.get("/api/fleet", params={"limit": 100, "offset": offset})).json()
        assert page["total"] == 250
        seen += [r["register_id"] for r in page["registers"]]
        offset = page["next_offset"]
    assert seen == sorted(seen)
    assert len(set(seen)) == 250

    top = (
        await client.get("/api/fleet", params={"sort": "pending", "desc": "1", "limit": 3})
    ).json()
    assert [r["pending"] for r in top["registers"]] == [250, 249, 248]

    offline = (await client.get("/api/fleet", params={"state": "offline", "center": "c-b"})).json()
    assert offline["total"] == 125
    assert {r["state"] for r in offline["registers"]} == {"offline"}
    assert (await client.get("/api/fleet", params={"state": "offline", "center": "c-a"})).json()[
        "total"
    ] == 0
    attention = (await client.get("/api/fleet", params={"attention": "1", "limit": 1})).json()
    assert attention["total"] == 125
    found = (await client.get("/api/fleet", params={"search": "r-012"})).json()
    assert [r["register_id"] for r in found["registers"]] == [f"r-012{i}" for i in range(10)]
    centers = (await client.get("/api/centers")).json()["centers"]
    assert [(c["center_id"], c["online"], c["offline"]) for c in centers] == [
        ("c-a", 125, 0),
        ("c-b", 0, 125),
    ]
    assert sum(c["pending"] for c in centers) == sum(range(1, 251))

    bad = await client.get("/api/fleet", params={"sort": "password"})
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "sort"
    bad_limit = await client.get("/api/fleet", params={"limit": "many"})
    assert bad_limit.json()["error"] == {
        "code": "invalid_value",
        "field": "limit",
        "reason": "limit must be an integer, not 'many'",
    }


async def test_sync_history_is_kept_from_each_heartbeat(
    clients: Clients, pool: asyncpg.Pool
) -> None:
    await _fleet_rows(pool, 2)
    summaries = [
        {"kind": "documents", "result": "successful", "started_at": 1_767_258_000_000,
         "finished_at": 1_767_258_001_000, "sent": 5, "received": 5, "errors": 0},
        {"kind": "catalog_delta", "result": "failed", "started_at": 1_767_258_060_000,
         "finished_at": 1_767_258_061_000, "sent": 0, "received": 0, "errors": 1},
    ]  # fmt: skip
    for summary in (*summaries, summaries[1]):  # the same summary twice: one row
        await pool.execute(
            "UPDATE register_presence SET last_sync = $2, last_error = $3 WHERE register_id = $1",
            "r-0001",
            summary,
            "delta timed out" if summary["result"] == "failed" else None,
        )
    rows = (await clients.viewer.get("/api/syncs", params={"register": "r-0001"})).json()["syncs"]
    assert [(r["kind"], r["result"], r["errors"]) for r in rows] == [
        ("catalog_delta", "failed", 1),
        ("documents", "successful", 0),
    ]
    assert rows[0]["last_error"] == "delta timed out"
    assert rows[1]["last_error"] is None
    failed = (await clients.viewer.get("/api/syncs", params={"result": "failed"})).json()
    assert len(failed["syncs"]) == 1
    assert (await clients.viewer.get("/api/syncs", params={"kind": "nap"})).status_code == 422


async def test_documents_page_by_cursor_with_integer_totals(
    clients: Clients, pool: asyncpg.Pool, enroll: Enroll, ingest: IngestService
) -> None:
    enrollment = await enroll()
    totals = [2500, 1999, 100_001, 7, 4990]
    async with Till(enrollment) as till:
        raws = [
            raw_document(enrollment.center_id, enrollment.register_id, seq, body=None)
            for seq in range(1, 6)
        ]
        for raw, total in zip(raws, totals, strict=True):
            body = raw["body"]
            body["lines"][0]["unit_price"] = body["lines"][0]["total"] = total
            body["payments"][0]["amount"] = body["total"] = total
        await till.publish_documents(raws)
        await till.wait_for(range(1, 6))
    client = clients.viewer
    seen: list[int] = []
    cursor = None
    while True:
        params = {"register": enrollment.register_id, "limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = (await client.get("/api/documents", params=params)).json()
        seen += [d["seq"] for d in page["documents"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [5, 4, 3, 2, 1]
    days = (
        await client.get("/api/receipts/days", params={"from": "2026-01-01", "to": "2026-01-01"})
    ).json()
    assert [(d["receipts"], d["sales"], d["currency"]) for d in days["days"]] == [
        (5, sum(totals), "CZK")
    ]
    assert isinstance(days["days"][0]["sales"], int)
    detail = (await client.get(f"/api/documents/{enrollment.register_id}/3")).json()
    assert detail["payload_json"]["body"]["total"] == totals[2]
    assert bytes.fromhex(detail["payload_hex"]) == canonical(raws[2])
    missing = await client.get(f"/api/documents/{enrollment.register_id}/99")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    bad = await client.get("/api/documents", params={"from": "yesterday"})
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "from"
    forged = await client.get("/api/documents", params={"cursor": "bm90IGEgY3Vyc29y"})
    assert forged.status_code == 422
    assert forged.json()["error"]["field"] == "cursor"


async def _move_by_mistake(pool: asyncpg.Pool, register_id: str) -> None:
    """The register is moved to another center by mistake: ingest refuses its documents."""
    await pool.execute("INSERT INTO centers (center_id, name) VALUES ('elsewhere', 'Elsewhere')")
    await pool.execute(
        "UPDATE registers SET center_id = 'elsewhere' WHERE register_id = $1", register_id
    )


async def _move_back(pool: asyncpg.Pool, register_id: str, center_id: str) -> None:
    await pool.execute(
        "UPDATE registers SET center_id = $2 WHERE register_id = $1", register_id, center_id
    )


async def test_a_dead_letter_is_replayed_through_ingest_after_the_fix(
    clients: Clients, pool: asyncpg.Pool, enroll: Enroll, ingest: IngestService
) -> None:
    enrollment = await enroll()
    register_id = enrollment.register_id
    await _move_by_mistake(pool, register_id)  # its documents are refused
    async with Till(enrollment) as till:
        await till.publish_documents([till.document(1)])
        acks = await till.wait_for([1])
        assert acks.rejected[1].code == "unknown_register"
        letters = (await clients.viewer.get("/api/dead-letters", params={"status": "new"})).json()
        assert len(letters["dead_letters"]) == 1
        letter = letters["dead_letters"][0]
        assert (letter["code"], letter["register_id"], letter["seq"]) == (
            "unknown_register", register_id, 1,
        )  # fmt: skip
        counts = (await clients.viewer.get("/api/dead-letters/counts")).json()["codes"]
        assert counts == [{"code": "unknown_register", "new": 1, "total": 1}]
        detail = (await clients.viewer.get(f"/api/dead-letters/{letter['id']}")).json()
        assert detail["decoded"]["body"]["receipt_no"] == "R-000001"
        assert detail["decode_error"] is None
        assert detail["replayable"] is True

        path = f"/api/dead-letters/{letter['id']}/replay"
        still = await clients.supervisor.post(path, json={"note": "too early"})
        assert still.status_code == 422
        assert still.json()["error"]["code"] == "replay_refused"
        assert "unknown_register" in still.json()["error"]["reason"]
        assert await pool.fetchval("SELECT count(*) FROM documents") == 0
        assert await pool.fetchval("SELECT count(*) FROM dead_letters") == 1  # not doubled

        await _move_back(pool, register_id, enrollment.center_id)  # the fix
        done = await clients.supervisor.post(path, json={"note": "center fixed"})
        assert done.status_code == 200, done.text
        assert done.json() == {
            "outcome": "stored", "register_id": register_id, "seq": 1, "acks_published": 1,
        }  # fmt: skip
        await until(lambda: _accepted(till, 1), timeout=20)

    assert (
        await pool.fetchval("SELECT count(*) FROM documents WHERE register_id = $1", register_id)
        == 1
    )
    row = await pool.fetchrow("SELECT status, status_reason FROM dead_letters")
    assert row is not None
    assert (row["status"], row["status_reason"]) == ("replayed", "center fixed")
    again = await clients.supervisor.post(path, json={})
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "already_settled"
    audit = await pool.fetch("SELECT username, action, target FROM audit_log ORDER BY id")
    assert [(a["username"], a["action"], a["target"]) for a in audit][-1] == (
        "op-supervisor", "dead_letter.replay", f"dead_letter:{letter['id']}",
    )  # fmt: skip


async def test_a_document_of_a_batch_is_replayed_on_its_own_after_the_fix(
    clients: Clients, pool: asyncpg.Pool, enroll: Enroll, ingest: IngestService
) -> None:
    enrollment = await enroll()
    register_id = enrollment.register_id
    await _move_by_mistake(pool, register_id)
    async with Till(enrollment) as till:
        members = [canonical(till.document(seq)) for seq in (1, 2)]
        await till.publish_batch(members)
        acks = await till.wait_for([1, 2])
        assert {acks.rejected[s].code for s in (1, 2)} == {"unknown_register"}
        listed = (await clients.viewer.get("/api/dead-letters", params={"status": "new"})).json()
        letters = {d["seq"]: d for d in listed["dead_letters"]}
        assert sorted(letters) == [1, 2]
        await _move_back(pool, register_id, enrollment.center_id)
        # The kept bytes are the document's own, under the batch's routing key.
        path = f"/api/dead-letters/{letters[2]['id']}/replay"
        done = await clients.supervisor.post(path, json={"note": "center fixed"})
        assert done.status_code == 200, done.text
        assert done.json() == {
            "outcome": "stored", "register_id": register_id, "seq": 2, "acks_published": 1,
        }  # fmt: skip
        await until(lambda: _accepted(till, 2), timeout=20)
    assert await pool.fetchval("SELECT array_agg(seq) FROM documents") == [2]
    assert bytes(await pool.fetchval("SELECT payload FROM documents")) == members[1]
    statuses = await pool.fetch("SELECT seq, status FROM dead_letters ORDER BY seq")
    assert [(r["seq"], r["status"]) for r in statuses] == [(1, "new"), (2, "replayed")]


async def _accepted(till: Till, seq: int) -> bool:
    return seq in till.acks.accepted


async def test_discard_needs_a_reason_and_keeps_the_bytes(
    clients: Clients, pool: asyncpg.Pool, enroll: Enroll, ingest: IngestService
) -> None:
    enrollment = await enroll()
    async with Till(enrollment) as till:
        await till.publish(b"\xc1 not msgpack", doc_type="receipt")
        await until(lambda: _count(pool, "SELECT count(*) FROM dead_letters"), timeout=20)
    letter = (await clients.viewer.get("/api/dead-letters")).json()["dead_letters"][0]
    detail = (await clients.viewer.get(f"/api/dead-letters/{letter['id']}")).json()
    assert detail["payload_hex"] == b"\xc1 not msgpack".hex()
    assert detail["decoded"] is None
    assert detail["decode_error"]["code"] == "malformed"
    path = f"/api/dead-letters/{letter['id']}/discard"
    no_reason = await clients.supervisor.post(path, json={})
    assert no_reason.status_code == 422
    assert no_reason.json()["error"]["field"] == "reason"
    done = await clients.supervisor.post(path, json={"reason": "a test till's garbage"})
    assert done.status_code == 200
    row = await pool.fetchrow("SELECT status, status_reason, payload FROM dead_letters")
    assert row is not None
    assert (row["status"], row["status_reason"]) == ("discarded", "a test till's garbage")
    assert bytes(row["payload"]) == b"\xc1 not msgpack"
    unknown = await clients.supervisor.post(
        "/api/dead-letters/999999/discard", json={"reason": "x"}
    )
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_dead_letter"


async def _count(pool: asyncpg.Pool, sql: str) -> bool:
    return bool(await pool.fetchval(sql))


async def test_queues_come_from_the_management_api(clients: Clients, ingest: IngestService) -> None:
    data: dict[str, Any] = {}

    async def consumed() -> bool:
        # The management API's figures lag the broker by a few seconds.
        data.update((await clients.viewer.get("/api/queues")).json())
        ingest_queue = [q for q in data["queues"] if q["name"] == topology.INGEST_QUEUE]
        return bool(ingest_queue) and ingest_queue[0]["consumers"] == 2

    await until(consumed, timeout=30, interval=1)
    by_name = {q["name"]: q for q in data["queues"]}
    assert by_name[topology.INGEST_QUEUE]["consumers"] == 2  # the ingest fixture's workers
    assert by_name[topology.INGEST_QUEUE]["type"] == "quorum"
    assert all(name.startswith("tillsync.") for name in by_name)
    assert len(data["history"][topology.INGEST_QUEUE]) >= 1


async def test_catalog_edits_and_reinit_commands(
    clients: Clients,
    pool: asyncpg.Pool,
    enroll: Enroll,
    admin_settings: CentralSettings,
    services: Services,
) -> None:
    enrollment = await enroll()
    center = enrollment.center_id
    item = {"name": "Rohlík", "gross_price": 390, "currency": "CZK", "tax_rate_id": "vat-12"}
    put = await clients.supervisor.put("/api/catalog/global/items/rohlik", json={"state": item})
    assert put.status_code == 200
    assert put.json()["version"] == 1
    price = {"gross_price": 450, "currency": "CZK"}
    put = await clients.supervisor.put(
        f"/api/catalog/{center}/prices/rohlik", json={"state": price}
    )
    assert put.status_code == 200, put.text
    invalid = await clients.supervisor.put(
        "/api/catalog/global/items/rohlik", json={"state": {**item, "gross_price": 3.9}}
    )
    assert invalid.status_code == 422
    assert "gross_price" in invalid.json()["error"]["field"]
    unknown = await clients.supervisor.put("/api/catalog/nowhere/prices/x", json={"state": price})
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "unknown_scope"

    listed = (await clients.viewer.get(f"/api/catalog/{center}/prices")).json()["entries"]
    assert [(e["key"], e["state"]["gross_price"]) for e in listed] == [("rohlik", 450)]
    scopes = {s["scope"]: s for s in (await clients.viewer.get("/api/catalog")).json()["scopes"]}
    assert scopes["global"]["last_seq"] == 1
    assert scopes[center]["last_seq"] == 1
    assert await pool.fetchval("SELECT count(*) FROM catalog_changelog") == 2

    sent = await clients.supervisor.post(
        "/api/commands/reinit", json={"center": center, "mode": "replace", "with_customers": False}
    )
    assert sent.status_code == 200, sent.text
    assert sent.json()["registers"] == [enrollment.register_id]
    neither = await clients.supervisor.post("/api/commands/reinit", json={"mode": "update"})
    assert neither.status_code == 422
    assert neither.json()["error"]["field"] == "register"
    ghost = await clients.supervisor.post(
        "/api/commands/reinit", json={"register": "ghost", "mode": "update"}
    )
    assert ghost.status_code == 404
    assert ghost.json()["error"]["code"] == "unknown_register"
    # The other end: the command waits in the register's own queue.
    vhost = vhost_of(admin_settings.amqp_url.get_secret_value())
    queue = topology.register_queue(enrollment.register_id)
    path = f"/api/queues/{quote(vhost, safe='')}/{quote(queue, safe='')}/get"
    api = rabbitmq_api_of(services)
    async with httpx.AsyncClient(base_url=api.base_url, auth=api.auth, timeout=10) as http:
        got = await http.post(
            path, json={"count": 10, "ackmode": "ack_requeue_false", "encoding": "base64"}
        )
    commands = [m for m in got.json() if m["properties"].get("type") == "reinit"]
    assert len(commands) == 1
    actions = [r["action"] for r in await pool.fetch("SELECT action FROM audit_log ORDER BY id")]
    assert actions.count("catalog.upsert") == 2
    assert actions.count("command.reinit") == 1


async def test_live_events_stream_documents_offline_registers_and_dead_letters(
    admin: AdminServer,
    clients: Clients,
    pool: asyncpg.Pool,
    enroll: Enroll,
    ingest: IngestService,
) -> None:
    enrollment = await enroll()
    register_id = enrollment.register_id
    await pool.execute(
        """
        INSERT INTO register_presence (register_id, last_seen, sent_at, agent_version, pending,
                                       rejected, acknowledged, last_seq, heartbeat)
        VALUES ($1, now(), now(), '1', 3, 0, 0, 0, '{}')
        """,
        register_id,
    )
    events: list[tuple[str, dict[str, Any]]] = []

    async def listen() -> None:
        async with clients.viewer.stream("GET", "/api/events", timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            name = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    events.append((name, json.loads(line[6:])))

    task = asyncio.create_task(listen())
    try:
        await until(lambda: _has(events, "ready"), timeout=10)
        await asyncio.sleep(1.5)  # the feed's first poll takes the starting point
        async with Till(enrollment) as till:
            await till.publish_documents([till.document(1)])
            await till.wait_for([1])
            await till.publish(b"\xc1", doc_type="receipt")
        await pool.execute(
            "UPDATE register_presence SET last_seen = now() - interval '1 hour' "
            "WHERE register_id = $1",
            register_id,
        )
        await until(lambda: _has(events, "document", "dead_letter", "offline"), timeout=20)
    finally:
        task.cancel()
    document = next(data for name, data in events if name == "document")
    assert (document["register_id"], document["seq"], document["total"]) == (register_id, 1, 2500)
    offline = next(data for name, data in events if name == "offline")
    assert offline["register_id"] == register_id
    assert offline["pending"] == 3
    letter = next(data for name, data in events if name == "dead_letter")
    assert letter["code"] == "malformed"


async def _has(events: list[tuple[str, dict[str, Any]]], *names: str) -> bool:
    return set(names) <= {name for name, _ in events}


async def test_metrics_are_mounted(clients: Clients) -> None:
    response = await clients.anonymous.get("/metrics")
    assert response.status_code == 200
    assert "tillsync_" in response.text


async def test_a_conflict_is_listed_then_resolved_with_a_reason(
    clients: Clients, pool: asyncpg.Pool, enroll: Enroll, ingest: IngestService
) -> None:
    enrollment = await enroll()
    async with Till(enrollment) as till:
        await till.publish_documents([till.document(1)])
        await till.wait_for([1])
        impostor = till.document(1, body=receipt_body(1, total=9900))
        till.acks.accepted.discard(1)
        await till.publish_documents([impostor])
        await till.wait_for([1])
    listed = (await clients.viewer.get("/api/conflicts")).json()["conflicts"]
    assert [(c["family"], c["code"], c["seq"]) for c in listed] == [("content", "content", 1)]
    conflict_id = listed[0]["id"]
    path = f"/api/conflicts/{conflict_id}/resolve"
    refused = await clients.viewer.post(path, json={"resolution": "kept the original"})
    assert refused.status_code == 403
    done = await clients.supervisor.post(path, json={"resolution": "kept the original"})
    assert done.status_code == 200, done.text
    row = await pool.fetchrow("SELECT resolved_at, resolution FROM conflicts")
    assert row is not None
    assert row["resolution"] == "kept the original"
    assert row["resolved_at"] is not None
    assert (await clients.viewer.get("/api/conflicts")).json()["conflicts"] == []
    resolved = (await clients.viewer.get("/api/conflicts", params={"resolved": "1"})).json()
    assert len(resolved["conflicts"]) == 1
    again = await clients.supervisor.post(path, json={"resolution": "twice"})
    assert again.status_code == 404
    assert await pool.fetchval("SELECT count(*) FROM documents") == 1


async def test_zreports_stand_beside_what_central_received(
    clients: Clients, enroll: Enroll, ingest: IngestService
) -> None:
    enrollment = await enroll()
    simulated = SimulatedTill(enrollment.register_id, receipts_per_shift=4)
    raws = []
    for seq in range(1, 7):  # shift_open, 4 sales (receipts or refunds), shift_close
        doc_type, body = simulated.next_document()
        raws.append(raw_document(enrollment.center_id, enrollment.register_id, seq, doc_type, body))
    assert raws[-1]["type"] == "shift_close"
    async with Till(enrollment) as till:
        await till.publish_documents(raws)
        acks = await till.wait_for(range(1, 7))
        assert acks.accepted == set(range(1, 7))
    zreports = (
        await clients.viewer.get("/api/zreports", params={"register": enrollment.register_id})
    ).json()["zreports"]
    assert len(zreports) == 1
    z = zreports[0]
    z_body = raws[-1]["body"]
    assert z["shift_no"] == 1
    assert z["net_total"] == z_body["net_total"]
    assert isinstance(z["net_total"], int)
    assert z["receipt_count"] + z["refund_count"] == z["receipts_received"]
    sales = [r["body"]["total"] for r in raws if r["type"] == "receipt"]
    refunds = [r["body"]["total"] for r in raws if r["type"] == "refund"]
    assert z["net_received"] == sum(sales) - sum(refunds)
    assert z["reconciliation"] is None  # no reconciler in this test: only ingest runs
    page = await clients.viewer.get("/documents", params={"register": enrollment.register_id})
    assert f'data-testid="zreport-{enrollment.register_id}-1"' in page.text
