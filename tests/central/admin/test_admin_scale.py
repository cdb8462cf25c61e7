"""The dashboard stays fast with a real-sized fleet: 1,000 registers with heartbeats and
200,000 documents (receipts), every list page and API read timed against real PostgreSQL.
The bound is loose (the machine is shared); the figures are printed (run with ``-s``) and
quoted in docs/admin.md."""

from __future__ import annotations

import time

import asyncpg

from .admin_clients import Clients

REGISTERS = 1000
DOCUMENTS = 200_000
BOUND_S = 1.0


async def _populate(pool: asyncpg.Pool) -> None:
    await pool.execute(
        """
        INSERT INTO centers (center_id, name)
        SELECT format('c-%s', n), format('Store %s', n) FROM generate_series(1, 50) n;
        INSERT INTO registers (register_id, center_id, broker_user)
        SELECT format('r-%s', n), format('c-%s', 1 + n % 50), format('reg-r-%s', n)
        FROM generate_series(1, 1000) n;
        INSERT INTO register_presence (register_id, last_seen, sent_at, agent_version, pending,
                                       rejected, acknowledged, last_seq, cursors, heartbeat)
        SELECT register_id, now() - make_interval(secs => (n % 7) * 20), now(), '0.1.0',
               n % 13, n % 3, 200, 200, '{"global": 0}', '{}'
        FROM (SELECT register_id, substr(register_id, 3)::int AS n FROM registers) r;
        """
    )
    await pool.execute(
        """
        INSERT INTO documents (register_id, seq, doc_id, center_id, doc_type, created_at,
                               payload, payload_json, content_hash)
        SELECT format('r-%s', 1 + n % 1000), 1 + n / 1000, gen_random_uuid(),
               format('c-%s', 1 + (1 + n % 1000) % 50), 'receipt',
               timestamptz '2026-01-01' + make_interval(secs => n * 3),
               '\\x80', '{}', sha256(int8send(n))
        FROM generate_series(0, $1 - 1) n
        """,
        DOCUMENTS,
    )
    await pool.execute(
        """
        INSERT INTO receipts (register_id, seq, doc_id, center_id, kind, receipt_no, shift_no,
                              currency, total, line_count, created_at)
        SELECT register_id, seq, doc_id, center_id, 'receipt', seq::text, 1, 'CZK',
               100 + seq % 9000, 1, created_at
        FROM documents
        """
    )
    await pool.execute("ANALYZE")


async def test_every_read_is_fast_with_1000_registers_and_200k_documents(
    clients: Clients, pool: asyncpg.Pool
) -> None:
    await _populate(pool)
    client = clients.viewer
    timings: dict[str, float] = {}
    reads: dict[str, tuple[str, dict[str, str | int]]] = {
        "fleet page": ("/api/fleet", {"limit": 100}),
        "fleet sorted by pending, offline only": (
            "/api/fleet",
            {"sort": "pending", "desc": 1, "state": "offline"},
        ),
        "fleet HTML page": ("/fleet", {}),
        "centers": ("/api/centers", {}),
        "documents, newest": ("/api/documents", {"limit": 100}),
        "documents of one register": ("/api/documents", {"register": "r-500"}),
        "documents of one center and day": (
            "/api/documents",
            {"center": "c-7", "from": "2026-01-03", "to": "2026-01-03"},
        ),
        "receipts per day, a week": (
            "/api/receipts/days",
            {"from": "2026-01-01", "to": "2026-01-07"},
        ),
        "documents HTML page": ("/documents", {"register": "r-500"}),
    }
    cookie_client = clients.viewer
    for name, (path, params) in reads.items():
        await cookie_client.get(path, params=params)  # warm: plans, pool, caches
        started = time.perf_counter()
        for _ in range(5):
            response = await cookie_client.get(path, params=params)
            assert response.status_code in (200, 303), (name, response.text[:300])
        timings[name] = (time.perf_counter() - started) / 5
    page = (await client.get("/api/fleet", params={"limit": 100})).json()
    assert page["total"] == REGISTERS
    print()
    for name, seconds in timings.items():
        print(f"{name:45s} {seconds * 1000:7.1f} ms")
    slow = {name: s for name, s in timings.items() if s > BOUND_S}
    assert not slow, slow
