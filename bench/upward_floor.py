"""The floor under the half-load latency target (issue #4): the upward pipeline with the
register-side durability the issue asks for, in plain sqlite3, aio-pika and asyncpg.

    uv run python bench/upward_floor.py [--rate 1200] [--seconds 8] [--registers 4]
                                        [--one-per-message]

``bench/upward.py``'s raw baseline publishes and stores, but keeps nothing on the register's
side. Tillsync's submit→ack also pays an outbox: a committed row before a document leaves,
a recorded confirm, an ack message back and a recorded ack. This measures that whole way,
written as plainly as it can be, with no tillsync code, on the same machine, at a paced
rate, so that tillsync's half-load p99 can be judged against what the machine allows:

* **registers** (R, all in this process, as ``bench/upward.py``'s in-process agents): one
  sqlite3 connection each (WAL, ``synchronous=FULL``) on a thread of its own. A submit is
  an ``INSERT`` committed before the document is published; the submits, confirms and acks
  that meet go in one transaction, and that transaction's submits in one message.
  Publishes are persistent, ``mandatory``, with confirms, many in flight, to a durable
  quorum queue through the default exchange. Each register consumes its acks from a
  classic queue of its own.
* **the consumer**, a child process as central is: prefetch 2,000, what has arrived (up to
  500) inserted in one asyncpg transaction (``ON CONFLICT DO NOTHING``), then one transient
  ack per register of the batch (the seqs it stored) with confirms, then one
  multiple ``basic.ack``.

Latency is submit → its ack committed in the register's SQLite, as tillsync's
``acked_at - created_at``. ``bench/upward.py`` runs this too, at its half-load rate, and
reports tillsync's p99 over the floor's (``--no-floor`` leaves it out).

It prints one JSON object; progress goes to stderr. It checks the invariant (every
submitted document stored once and acknowledged once) and says so in ``"valid"``; nothing
is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sqlite3
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from _setup import (
    Sandbox,
    Services,
    cores_used,
    cpu_sample,
    documents_table,
    latency_summary,
    progress,
    run_and_print,
    sandbox,
    services_from_env,
    stop_child,
)
from tillsync_agent.process import shorten_switch_interval, tune_gc

QUEUE = "floor.documents"
ACK_QUEUE = "floor.reg.{}"
PAYLOAD_BYTES = 678  # tillsync's median document in bench/upward.py
DRAIN_TIMEOUT_S = 60.0
PREFETCH = 2000
BATCH_MAX = 500

OUTBOX = """
CREATE TABLE outbox (
    seq INTEGER PRIMARY KEY, payload BLOB NOT NULL, state INTEGER NOT NULL DEFAULT 0
)"""
TABLE, INSERT = documents_table("floor_documents")


# -- a register ------------------------------------------------------------------------------


@dataclass
class FloorRegister:
    """An outbox in SQLite, its writer thread, and its publishes and acks."""

    name: str
    db: sqlite3.Connection
    exchange: aio_pika.abc.AbstractExchange
    batch: bool
    thread: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))
    submits: list[tuple[int, bytes, float]] = field(default_factory=list)
    confirmed: list[int] = field(default_factory=list)
    acked: list[int] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    submitted_at: dict[int, float] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    to_confirm_ms: list[float] = field(default_factory=list)
    acks_received: int = 0
    failures: int = 0
    publishes: set[asyncio.Task[None]] = field(default_factory=set)

    def submit(self, seq: int, payload: bytes) -> None:
        self.submits.append((seq, payload, time.perf_counter()))
        self.wake.set()

    async def write(self) -> None:
        """The one writer: whatever met since the last transaction, in one."""
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            submits, self.submits = self.submits, []
            confirmed, self.confirmed = self.confirmed, []
            acked, self.acked = self.acked, []
            await loop.run_in_executor(
                self.thread, _transaction, self.db, submits, confirmed, acked
            )
            now = time.perf_counter()
            for seq in acked:
                self.latencies_ms.append((now - self.submitted_at[seq]) * 1e3)
            for seq, _, at in submits:
                self.submitted_at[seq] = at
            # One message a transaction's submits (the batch), or one a document.
            runs = [submits] if self.batch else [[submit] for submit in submits]
            for run in runs:
                if run:
                    task = asyncio.create_task(self._publish([(s[0], s[1]) for s in run]))
                    self.publishes.add(task)
                    task.add_done_callback(self.publishes.discard)

    async def _publish(self, docs: list[tuple[int, bytes]]) -> None:
        """``docs`` in one message: each ``seq`` and payload, length-prefixed."""
        body = b"".join(struct.pack(">QI", seq, len(payload)) + payload for seq, payload in docs)
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=f"{self.name}:{docs[0][0]}",
        )
        try:
            await self.exchange.publish(message, QUEUE, mandatory=True, timeout=30)
        except Exception:  # the floor has no retry: a failure makes the run invalid
            self.failures += len(docs)
            return
        now = time.perf_counter()
        for seq, _ in docs:
            self.to_confirm_ms.append((now - self.submitted_at[seq]) * 1e3)
            self.confirmed.append(seq)
        self.wake.set()

    async def on_ack(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        seqs = [int(s) for s in message.body.split(b",")]
        self.acks_received += len(seqs)
        self.acked.extend(seqs)
        self.wake.set()


def _transaction(
    db: sqlite3.Connection,
    submits: list[tuple[int, bytes, float]],
    confirmed: list[int],
    acked: list[int],
) -> None:
    db.execute("BEGIN IMMEDIATE")
    db.executemany("INSERT INTO outbox (seq, payload) VALUES (?, ?)", [s[:2] for s in submits])
    db.executemany(
        "UPDATE outbox SET state = 1 WHERE seq = ? AND state = 0", [(s,) for s in confirmed]
    )
    db.executemany("UPDATE outbox SET state = 2 WHERE seq = ?", [(s,) for s in acked])
    db.execute("COMMIT")


def _open_outbox(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(OUTBOX)
    return db


# -- the consumer (a child process) -----------------------------------------------------------


async def consume(amqp_url: str, database_url: str) -> None:
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
    connection = await aio_pika.connect(amqp_url, timeout=15)
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    work = asyncio.create_task(_consume(pool, connection))
    stop = asyncio.create_task(stopping.wait())
    try:
        await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            work.result()  # its error, if it failed
    finally:
        work.cancel()
        stop.cancel()
        await connection.close()
        await pool.close()


async def _consume(pool: asyncpg.Pool, connection: aio_pika.abc.AbstractConnection) -> None:
    channel = await connection.channel(publisher_confirms=True)
    await channel.set_qos(prefetch_count=PREFETCH)
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    await (await channel.get_queue(QUEUE)).consume(inbox.put)
    print("consuming", flush=True)
    while True:
        batch = [await inbox.get()]
        while len(batch) < BATCH_MAX and not inbox.empty():
            batch.append(inbox.get_nowait())
        rows = [row for message in batch for row in _split(message)]
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(INSERT, *(list(column) for column in zip(*rows, strict=True)))
        per_register: dict[str, list[str]] = {}
        for register, seq, _ in rows:
            per_register.setdefault(register, []).append(str(seq))
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(",".join(seqs).encode()),
                    ACK_QUEUE.format(register),
                    timeout=30,
                )
                for register, seqs in per_register.items()
            )
        )
        await batch[-1].ack(multiple=True)


def _split(message: aio_pika.abc.AbstractIncomingMessage) -> list[tuple[str, int, bytes]]:
    register = str(message.message_id).split(":")[0]
    body, rows, at = message.body, [], 0
    while at < len(body):
        seq, size = struct.unpack_from(">QI", body, at)
        at += 12
        rows.append((register, seq, body[at : at + size]))
        at += size
    return rows


# -- the run -----------------------------------------------------------------------------------


async def run(
    services: Services, rate: float, seconds: float, registers: int, batch: bool
) -> dict[str, Any]:
    async with sandbox(services) as box:
        return {"sandbox": box.name, **await floor(box, rate, seconds, registers, batch)}


async def floor(
    box: Sandbox, rate: float, seconds: float, registers: int, batch: bool = True
) -> dict[str, Any]:
    """The floor pipeline at ``rate`` for ``seconds``, in ``box`` (its own queues and table,
    beside whatever else the sandbox holds)."""
    pool = await asyncpg.create_pool(box.database_url, min_size=1, max_size=2)
    connection = await aio_pika.connect(box.amqp_url, timeout=15)
    child: asyncio.subprocess.Process | None = None
    try:
        await pool.execute(TABLE)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await channel.declare_queue(QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
        names = [f"r{n}" for n in range(registers)]
        acks = await connection.channel()
        for name in names:
            await channel.declare_queue(
                ACK_QUEUE.format(name), durable=True, arguments={"x-queue-type": "classic"}
            )
        child = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--consumer", box.amqp_url, box.database_url,
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert child.stdout is not None
        ready = await asyncio.wait_for(child.stdout.readline(), timeout=30)
        if ready.strip() != b"consuming":
            raise RuntimeError(f"the consumer did not start: {ready!r}")
        with tempfile.TemporaryDirectory(prefix="tillsync-floor-") as tmp:
            fleet = [
                FloorRegister(
                    name,
                    _open_outbox(Path(tmp) / f"{name}.db"),
                    channel.default_exchange,
                    batch,
                )
                for name in names
            ]
            for register in fleet:
                queue = await acks.get_queue(ACK_QUEUE.format(register.name))
                await queue.consume(register.on_ack, no_ack=True)
            writers = [asyncio.create_task(register.write()) for register in fleet]
            try:
                result = await _paced(fleet, rate, seconds, child.pid)
            finally:
                for writer in writers:
                    writer.cancel()
                for register in fleet:
                    register.thread.shutdown()
                    register.db.close()
        stored = await pool.fetchval("SELECT count(*) FROM floor_documents")
        result["stored"] = int(stored)
        result["valid"] = bool(
            result["drained"]
            and stored == result["documents"]
            and result["acks_received"] == result["documents"]
            and result["publish_failures"] == 0
        )
        return result
    finally:
        if child is not None:
            await stop_child(child, grace_s=5)
        await connection.close()
        # aio-pika schedules its channels' close callbacks as tasks: let them run before
        # the loop ends (else "Task was destroyed but it is pending").
        await asyncio.sleep(0.05)
        await pool.close()


async def _paced(
    fleet: Sequence[FloorRegister], rate: float, seconds: float, consumer_pid: int
) -> dict[str, Any]:
    total = max(1, int(rate * seconds))
    progress(f"floor: {total} documents at {rate:.0f}/s over {len(fleet)} registers")
    payload = os.urandom(PAYLOAD_BYTES)
    loop = asyncio.get_running_loop()
    before = cpu_sample(consumer_pid, "")
    start = loop.time()
    sent = 0
    while sent < total:
        due = min(total, int((loop.time() - start) * rate) + 1)
        while sent < due:
            fleet[sent % len(fleet)].submit(sent // len(fleet) + 1, payload)
            sent += 1
        await asyncio.sleep(0.002)
    achieved = total / (loop.time() - start)
    deadline = loop.time() + DRAIN_TIMEOUT_S
    # Polled, not awaited: the registers' writers stay as plain as the floor should be.
    while sum(len(r.latencies_ms) for r in fleet) < total and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    cpu = cores_used(before, cpu_sample(consumer_pid, ""))
    cpu["consumer"] = cpu.pop("central")
    # The sample names no database: every PostgreSQL process counts, as the machine's.
    cpu["postgres"] = round(cpu.pop("postgres_sandbox") + cpu.pop("postgres_other"), 2)
    latencies = [ms for register in fleet for ms in register.latencies_ms]
    return {
        "target_rate_per_s": rate,
        "achieved_rate_per_s": round(achieved, 1),
        "registers": len(fleet),
        "documents": total,
        "drained": len(latencies) == total,
        "submit_to_ack": latency_summary(latencies),
        "submit_to_confirmed": latency_summary(
            [ms for register in fleet for ms in register.to_confirm_ms]
        ),
        "batch": fleet[0].batch,
        "acks_received": sum(r.acks_received for r in fleet),
        "publish_failures": sum(r.failures for r in fleet),
        "cores_used": cpu,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=1200.0, help="documents a second")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--registers", type=int, default=4)
    parser.add_argument(
        "--one-per-message",
        action="store_false",
        dest="batch",
        help="one message a document; default: one a transaction's submits, as tillsync's "
        "document_batch",
    )
    parser.add_argument("--json-only", action="store_true", help="no progress on stderr")
    parser.add_argument(
        "--consumer", nargs=2, metavar=("AMQP_URL", "DATABASE_URL"), help=argparse.SUPPRESS
    )
    options = parser.parse_args(argv)
    # The same collector and switch interval as bench/upward.py's process (and the agent's).
    tune_gc()
    shorten_switch_interval()
    if options.consumer:
        asyncio.run(consume(*options.consumer))
        return 0
    progress.enabled = not options.json_only
    work = run(services_from_env(), options.rate, options.seconds, options.registers, options.batch)
    return run_and_print(work)


if __name__ == "__main__":
    sys.exit(main())
