"""Reconciliation (invariant 6): holes in registers' seqs, and Z-reports against receipts.

Every ``reconcile_interval_s`` one pass, in one transaction that takes an advisory lock
(so with several central processes one pass runs at a time and the others skip):

1. **Holes.** For each register whose ``last_seq`` is past its ``contiguous_seq`` (the
   ``register_state`` row store.py keeps), find the missing ranges, move
   ``contiguous_seq`` up to the first of them (only ever forward), and keep each range
   in ``seq_holes``. A pass searches the open holes again and the documents stored since
   the last search (``gaps_checked_seq``), not all after ``contiguous_seq``: behind a
   hole that never fills that was the register's whole history, every pass. A hole
   younger than ``reconcile_hole_grace_s`` is left alone: two ingest workers commit
   batches out of order and most holes close within milliseconds.
   An older one gets a ``resend_request`` (key ``reg.<register>.resend``), repeated with
   the shared capped backoff while it stays open, unless central refused every seq of it
   itself (the register holds those as rejected). A filled hole is marked resolved.
   Central cannot see missing documents at the *end* of a register's seqs; the register's
   own ack timeout resends those.
2. **Shifts.** Each closed shift (a stored Z-report) is checked once every seq of its
   range ``first_seq..last_seq`` is stored: receipt, refund and void counts, gross sales,
   refunds and the sales per payment method reported by the register against what
   central received for that shift. The result (``ok`` or ``mismatch`` with each
   differing field) is final; until then the shift is ``waiting``.
3. **Stock.** The stock movements ingest recorded since the last pass are folded into
   the centers' ``stock_levels`` (:mod:`tillsync_central.stock`).

Resend requests are published after the pass's writes and before its commit; if the
commit fails the register may be asked twice, which only makes it resend what central
then recognises as duplicates.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import aio_pika
import asyncpg
import structlog

from tillsync_protocol import Backoff, TillsyncError, topology
from tillsync_protocol.control import ResendRequest, ResendRequestBody

from .confirms import control_message, publish_in_order
from .consumer import CLOSE_TIMEOUT_S, connect_amqp, wait_any
from .dead_letters import Conn
from .settings import CentralSettings
from .stock import fold_stock

__all__ = [
    "Difference",
    "PassResult",
    "ReconcileStats",
    "Reconciler",
    "reconcile_pass",
]

log = structlog.get_logger(__name__)

# Any constant both sides agree on; pg_try_advisory_xact_lock(int, int) namespaces it.
RECONCILE_LOCK = (0x7469, 0x5EC0)
MAX_GAPS_PER_REGISTER = 100
MAX_SHIFTS_PER_PASS = 500

_LOCK = "SELECT pg_try_advisory_xact_lock($1, $2)"

_LAGGING = """
SELECT register_id, contiguous_seq, gaps_checked_seq FROM register_state
WHERE last_seq > contiguous_seq ORDER BY register_id
"""

# The open holes above contiguous_seq of the lagging registers, in seq order.
_OPEN_HOLES = """
SELECT h.register_id, h.from_seq, h.to_seq
FROM seq_holes h JOIN register_state st USING (register_id)
WHERE h.resolved_at IS NULL AND h.to_seq > st.contiguous_seq
  AND h.register_id = ANY($1::text[])
ORDER BY h.register_id, h.from_seq
"""

# The missing ranges inside windows lo..hi of one register's seqs: the open holes found
# before (hi set) and the tail after what earlier passes searched (hi NULL). A gap is
# before each stored seq whose predecessor in its window (lo - 1 for the first) is not
# the seq right before it; a hole's window counts hi + 1 as stored, so a hole's
# unfilled end stays a gap. In seq order, at most $4 of them; and one row with from_seq
# NULL and the greatest seq stored in the tail window as to_seq (NULL: none). One
# statement, so both come from one snapshot of the table.
_GAPS = """
WITH stored AS (
    SELECT w.lo, w.hi, d.seq
    FROM unnest($2::bigint[], $3::bigint[]) AS w (lo, hi)
    CROSS JOIN LATERAL (
        SELECT seq FROM documents
        WHERE register_id = $1 AND seq BETWEEN w.lo AND coalesce(w.hi, 9223372036854775806)
        UNION ALL
        SELECT w.hi + 1 WHERE w.hi IS NOT NULL
    ) d
), gaps AS (
    SELECT coalesce(lag(seq) OVER (PARTITION BY lo ORDER BY seq), lo - 1) + 1 AS from_seq,
           seq - 1 AS to_seq
    FROM stored
)
(SELECT from_seq, to_seq FROM gaps WHERE to_seq >= from_seq ORDER BY from_seq LIMIT $4)
UNION ALL
SELECT NULL, max(seq) FROM stored WHERE hi IS NULL
"""

# The seq $2 is stored; last_seq may not have reached it yet (ingest's state writer
# comes after the acks), and the table checks last_seq >= contiguous_seq. $3: where the
# next pass's search for new holes starts (it may go back, see _search).
_ADVANCE = """
UPDATE register_state
SET contiguous_seq = greatest(contiguous_seq, $2), last_seq = greatest(last_seq, $2),
    gaps_checked_seq = $3
WHERE register_id = $1
"""

_OPEN_HOLE = """
INSERT INTO seq_holes (register_id, from_seq, to_seq) VALUES ($1, $2, $3)
ON CONFLICT (register_id, from_seq) WHERE resolved_at IS NULL
DO UPDATE SET to_seq = EXCLUDED.to_seq
"""

# Resolved: an open hole now behind contiguous_seq (every seq up to it is stored), and
# one this pass searched ($1, $2) and did not find again ($3, $4); a hole filled from its
# start is found again under another from_seq, as a new hole.
_RESOLVE = """
UPDATE seq_holes h SET resolved_at = now()
FROM register_state st
WHERE h.resolved_at IS NULL AND st.register_id = h.register_id
  AND (h.to_seq <= st.contiguous_seq
       OR ((h.register_id, h.from_seq) IN (SELECT * FROM unnest($1::text[], $2::bigint[]))
           AND (h.register_id, h.from_seq) NOT IN (
               SELECT * FROM unnest($3::text[], $4::bigint[]))))
RETURNING h.register_id, h.from_seq, h.to_seq, h.requests
"""

# Not due: a hole every seq of which central refused itself (an ingest dead letter with
# that register and seq). The register was sent the rejection and holds those rows as
# rejected, so a request would bring nothing back, every hour for ever; the hole stays
# open, to be filled by replaying the dead letters.
_DUE = """
SELECT id, register_id, from_seq, to_seq, requests FROM seq_holes h
WHERE resolved_at IS NULL
  AND detected_at <= now() - make_interval(secs => $1)
  AND (last_requested_at IS NULL
       OR last_requested_at <= now() - make_interval(secs => least($2, $1 * 2 ^ requests)))
  AND (SELECT count(DISTINCT d.seq) FROM dead_letters d
       WHERE d.register_id = h.register_id AND d.seq BETWEEN h.from_seq AND h.to_seq
         AND d.source = 'ingest') < h.to_seq - h.from_seq + 1
ORDER BY detected_at
LIMIT 1000
"""

_REQUESTED = """
UPDATE seq_holes SET requests = requests + 1, last_requested_at = now()
WHERE id = ANY($1::bigint[])
"""

_CLOSED_SHIFTS = """
SELECT s.register_id, s.shift_no, s.first_seq, s.last_seq, s.receipt_count, s.refund_count,
       s.void_count, s.gross_sales, s.refunds_total, s.payments,
       st.contiguous_seq
FROM shifts s
JOIN register_state st USING (register_id)
LEFT JOIN shift_reconciliations r USING (register_id, shift_no)
WHERE s.closed_seq IS NOT NULL AND NOT s.z_checked
ORDER BY r.checked_at NULLS FIRST, s.closed_at
LIMIT $1
"""
# Unchecked shifts come from the partial index shifts_unchecked_idx (migration 0006), not
# from an anti-join over every closed shift; never-checked ones first, then the least
# recently checked, so shifts waiting for long (a register with a hole) cannot starve
# newer ones.

_RECEIPT_TOTALS = """
SELECT kind, count(*) AS n, coalesce(sum(total), 0)::bigint AS total
FROM receipts WHERE register_id = $1 AND shift_no = $2
GROUP BY kind
"""

_VOIDS = """
SELECT count(*) FROM documents
WHERE register_id = $1 AND doc_type = 'void' AND seq BETWEEN $3 AND $4
  AND (payload_json -> 'body' ->> 'shift_no')::bigint = $2
"""

_SALES_BY_METHOD = """
SELECT p ->> 'method_id' AS method_id, count(DISTINCT r.seq) AS n,
       sum((p ->> 'amount')::bigint)::bigint AS amount
FROM receipts r
JOIN documents d USING (register_id, seq)
CROSS JOIN LATERAL jsonb_array_elements(d.payload_json -> 'body' -> 'payments') AS p
WHERE r.register_id = $1 AND r.shift_no = $2 AND r.kind = 'receipt'
GROUP BY 1
"""

# A final verdict ('ok', 'mismatch') takes the shift out of the unchecked index.
_SAVE_SHIFT = """
WITH saved AS (
    INSERT INTO shift_reconciliations (register_id, shift_no, status, differences)
    VALUES ($1, $2, $3, $4::jsonb)
    ON CONFLICT (register_id, shift_no)
    DO UPDATE SET status = EXCLUDED.status, differences = EXCLUDED.differences,
                  checked_at = now()
    RETURNING register_id, shift_no, status
)
UPDATE shifts s SET z_checked = true
FROM saved
WHERE saved.status <> 'waiting'
  AND s.register_id = saved.register_id AND s.shift_no = saved.shift_no
"""


@dataclass(frozen=True)
class Difference:
    """One Z-report field that does not match what central received."""

    field: str
    reported: int
    found: int


@dataclass
class PassResult:
    """What one pass did (``locked`` False: another process's pass was running)."""

    locked: bool = True
    holes_open: int = 0
    holes_resolved: int = 0
    requests: list[ResendRequestBody] = field(default_factory=list)
    shifts_ok: int = 0
    shifts_mismatch: int = 0
    shifts_waiting: int = 0
    stock_rows: int = 0


@dataclass
class ReconcileStats:
    """Counters of one process, since it started."""

    passes: int = 0
    skipped: int = 0
    resend_requests: int = 0
    holes_resolved: int = 0
    shifts_ok: int = 0
    shifts_mismatch: int = 0
    stock_rows: int = 0
    failures: int = 0


async def reconcile_pass(
    conn: Conn,
    exchange: aio_pika.abc.AbstractExchange | None,
    *,
    hole_grace_s: float,
    request_cap_s: float,
) -> PassResult:
    """One pass in one transaction. With ``exchange`` None, holes are recorded but no
    request is sent (``tillsync-central reconcile --dry-run``)."""
    async with conn.transaction():
        if not await conn.fetchval(_LOCK, *RECONCILE_LOCK):
            return PassResult(locked=False)
        result = PassResult()
        await _search_holes(conn, result)
        if exchange is not None:
            due = await conn.fetch(_DUE, hole_grace_s, request_cap_s)
            if due:
                result.requests = await _request(exchange, due)
                await conn.execute(_REQUESTED, [row["id"] for row in due])
        await _reconcile_shifts(conn, result)
        result.stock_rows = await _fold_stock(conn)
        return result


@dataclass(frozen=True)
class _Search:
    """What a pass searched of one register's seqs and what it found there."""

    holes: list[tuple[int, int]]
    """The open holes searched again, (from_seq, to_seq)."""
    gaps: list[tuple[int, int]]
    """The missing ranges found, in seq order."""
    contiguous: int
    """Every seq up to it is stored."""
    checked: int
    """Where the next pass starts looking for new holes (``gaps_checked_seq``)."""


async def _search(
    conn: Conn,
    register_id: str,
    contiguous: int,
    checked: int,
    holes: Sequence[tuple[int, int]],
) -> _Search:
    """Search one register's open holes again, and the documents stored after what the
    last search reached (``checked``), not every document after ``contiguous``: behind a
    hole that never fills, that would be the register's whole history at every pass.

    ``holes`` are the register's open holes above ``contiguous``, in seq order. Those
    starting after ``checked`` (left there when a pass kept only its first
    :data:`MAX_GAPS_PER_REGISTER` gaps) lie in the tail and are searched with it."""
    reached = max(contiguous, checked)
    inside = [h for h in holes if h[0] <= reached]
    windows = inside[:MAX_GAPS_PER_REGISTER]
    tail = len(inside) <= MAX_GAPS_PER_REGISTER  # else the holes before it come first
    lows = [lo for lo, _ in windows]
    highs: list[int | None] = [hi for _, hi in windows]
    if tail:
        lows.append(max([reached] + [hi for _, hi in windows]) + 1)
        highs.append(None)
    rows = await conn.fetch(_GAPS, register_id, lows, highs, MAX_GAPS_PER_REGISTER + 1)
    seen: int | None = next(r["to_seq"] for r in rows if r["from_seq"] is None)
    gaps = [(r["from_seq"], r["to_seq"]) for r in rows if r["from_seq"] is not None]
    searched = list(windows) + ([h for h in holes if h[0] > reached] if tail else [])
    if len(gaps) > MAX_GAPS_PER_REGISTER:
        # Too many for one pass: keep the first ones. The next pass searches on from the
        # end of the last one kept (a stored seq follows it), holes or tail alike.
        gaps = gaps[:MAX_GAPS_PER_REGISTER]
        end = gaps[-1][1]
        searched = [h for h in searched if h[0] <= end]
    elif tail:
        end = max(reached, seen or 0)
    else:
        end = reached
    firsts = [gaps[0][0]] if gaps else []
    firsts += [h[0] for h in holes if h not in searched][:1]
    # Without a gap or an unsearched hole, every seq up to ``end`` is stored.
    through = min(firsts) - 1 if firsts else end
    return _Search(searched, gaps, max(through, contiguous), end)


async def _search_holes(conn: Conn, result: PassResult) -> None:
    """Step 1 of a pass (see the module's docstring)."""
    lagging = await conn.fetch(_LAGGING)
    open_holes: dict[str, list[tuple[int, int]]] = {}
    for row in await conn.fetch(_OPEN_HOLES, [r["register_id"] for r in lagging]):
        open_holes.setdefault(row["register_id"], []).append((row["from_seq"], row["to_seq"]))
    searched: list[tuple[str, int]] = []
    found: list[tuple[str, int]] = []
    for row in lagging:
        register_id = row["register_id"]
        search = await _search(
            conn,
            register_id,
            row["contiguous_seq"],
            row["gaps_checked_seq"],
            open_holes.get(register_id, []),
        )
        await conn.execute(_ADVANCE, register_id, search.contiguous, search.checked)
        for from_seq, to_seq in search.gaps:
            await conn.execute(_OPEN_HOLE, register_id, from_seq, to_seq)
            found.append((register_id, from_seq))
        searched.extend((register_id, from_seq) for from_seq, _ in search.holes)
    result.holes_open = len(found)
    resolved = await conn.fetch(
        _RESOLVE,
        [r for r, _ in searched],
        [s for _, s in searched],
        [r for r, _ in found],
        [s for _, s in found],
    )
    for hole in resolved:
        result.holes_resolved += 1
        log.info(
            "seq hole filled",
            register_id=hole["register_id"],
            from_seq=hole["from_seq"],
            to_seq=hole["to_seq"],
            requests=hole["requests"],
        )


async def _fold_stock(conn: Conn) -> int:
    """Fold the stock moves in a savepoint: if that fails for a reason of its own (a
    center without a catalog scope, a stock row that no longer validates), the moves stay
    pending for the next pass and the holes and shifts of this pass still commit."""
    try:
        async with conn.transaction():
            return await fold_stock(conn)
    except TillsyncError as exc:
        log.warning("stock not folded", code=exc.code, field=exc.field, reason=exc.reason)
        return 0


async def _request(
    exchange: aio_pika.abc.AbstractExchange, due: Sequence[asyncpg.Record]
) -> list[ResendRequestBody]:
    bodies = [
        ResendRequestBody(
            register_id=row["register_id"],
            from_seq=row["from_seq"],
            to_seq=row["to_seq"],
            reason=f"seqs {row['from_seq']}..{row['to_seq']} missing at central"
            + (f" (request {row['requests'] + 1})" if row["requests"] else ""),
        )
        for row in due
    ]
    messages = []
    for body in bodies:
        request = ResendRequest(
            msg_id=str(uuid.uuid4()), created_at=time.time_ns() // 1_000_000, body=body
        )
        key = topology.register_key(body.register_id, "resend")
        messages.append((control_message(request), key))
    await publish_in_order(exchange, messages)
    for body in bodies:
        log.warning(
            "resend requested",
            register_id=body.register_id,
            from_seq=body.from_seq,
            to_seq=body.to_seq,
        )
    return bodies


async def _reconcile_shifts(conn: Conn, result: PassResult) -> None:
    for shift in await conn.fetch(_CLOSED_SHIFTS, MAX_SHIFTS_PER_PASS):
        register_id, shift_no = shift["register_id"], shift["shift_no"]
        if shift["contiguous_seq"] < shift["last_seq"]:
            await conn.execute(_SAVE_SHIFT, register_id, shift_no, "waiting", [])
            result.shifts_waiting += 1
            continue
        differences = await shift_differences(conn, shift)
        status = "mismatch" if differences else "ok"
        await conn.execute(
            _SAVE_SHIFT,
            register_id,
            shift_no,
            status,
            [vars(d) for d in differences],  # the pool's codec encodes jsonb
        )
        if differences:
            result.shifts_mismatch += 1
            log.warning(
                "shift does not reconcile",
                register_id=register_id,
                shift_no=shift_no,
                differences=[vars(d) for d in differences],
            )
        else:
            result.shifts_ok += 1


async def shift_differences(conn: Conn, shift: asyncpg.Record) -> list[Difference]:
    """The Z-report fields of ``shift`` (a ``shifts`` row) that central's documents contradict."""
    register_id, shift_no = shift["register_id"], shift["shift_no"]
    totals = {
        row["kind"]: (row["n"], row["total"])
        for row in await conn.fetch(_RECEIPT_TOTALS, register_id, shift_no)
    }
    voids = await conn.fetchval(
        _VOIDS, register_id, shift_no, shift["first_seq"], shift["last_seq"]
    )
    found: dict[str, int] = {
        "receipt_count": totals.get("receipt", (0, 0))[0],
        "refund_count": totals.get("refund", (0, 0))[0],
        "void_count": voids,
        "gross_sales": totals.get("receipt", (0, 0))[1],
        "refunds_total": totals.get("refund", (0, 0))[1],
    }
    reported: dict[str, int] = {name: shift[name] for name in found}
    for row in await conn.fetch(_SALES_BY_METHOD, register_id, shift_no):
        found[f"payments[{row['method_id']}].count"] = row["n"]
        found[f"payments[{row['method_id']}].amount"] = row["amount"]
    for payment in shift["payments"] or []:  # jsonb, decoded by the pool's codec
        reported[f"payments[{payment['method_id']}].count"] = int(payment["count"])
        reported[f"payments[{payment['method_id']}].amount"] = int(payment["amount"])
    return [
        Difference(name, reported.get(name, 0), found.get(name, 0))
        for name in sorted(set(found) | set(reported))
        if reported.get(name, 0) != found.get(name, 0)
    ]


class Reconciler:
    """``await reconciler.run(stopping)``: a pass every ``reconcile_interval_s``."""

    name = "reconciler"

    def __init__(self, settings: CentralSettings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self._backoff = Backoff(0.5, 30.0)
        self.stats = ReconcileStats()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                await self._session(stopping)
            except (TimeoutError, Exception) as exc:
                self.stats.failures += 1
                log.warning("reconciler session ended", error=f"{type(exc).__name__}: {exc}")
            if stopping.is_set():
                break
            await wait_any((stopping,), self._backoff.next())
        log.info("reconciler stopped", **vars(self.stats))

    async def _session(self, stopping: asyncio.Event) -> None:
        connection = await connect_amqp(
            self._settings.amqp_url.get_secret_value(), "tillsync-central reconciler"
        )
        try:
            closed = asyncio.Event()
            connection.close_callbacks.add(lambda *_: closed.set())
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange(topology.REGISTERS_EXCHANGE, ensure=False)
            while not stopping.is_set():
                if closed.is_set():
                    raise ConnectionError("broker connection closed")
                await self.run_once(exchange)
                self._backoff.reset()
                await wait_any((stopping, closed), self._settings.reconcile_interval_s)
        finally:
            try:
                await asyncio.wait_for(connection.close(), timeout=CLOSE_TIMEOUT_S)
            except (TimeoutError, Exception):
                pass  # a dead connection: nothing to close

    async def run_once(self, exchange: aio_pika.abc.AbstractExchange | None) -> PassResult:
        async with self._pool.acquire() as conn:
            result = await reconcile_pass(
                conn,
                exchange,
                hole_grace_s=self._settings.reconcile_hole_grace_s,
                request_cap_s=self._settings.reconcile_request_cap_s,
            )
        stats = self.stats
        if not result.locked:
            stats.skipped += 1
            return result
        stats.passes += 1
        stats.resend_requests += len(result.requests)
        stats.holes_resolved += result.holes_resolved
        stats.shifts_ok += result.shifts_ok
        stats.shifts_mismatch += result.shifts_mismatch
        stats.stock_rows += result.stock_rows
        return result
