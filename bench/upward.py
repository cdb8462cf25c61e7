"""Benchmark of the upward flow (issue #4): registers → broker → central → PostgreSQL.

    uv run python bench/upward.py [--docs 20000] [--registers 4] [--workers 2] [--json-only]

One run, on its own fresh vhost and database (created at start, dropped at the end, even
on Ctrl-C), measures:

1. tillsync end to end: the real ``tillsync-central run --workers W`` subprocess, R
   registers provisioned through the management API, R in-process agents; N simulated
   documents submitted as fast as the agents take them; wall time from the first submit
   until every agent has nothing pending, and submit→ack latency of every document from
   the outboxes (``acked_at - created_at``);
2. the same at half the throughput just measured (paced), latency of those documents only;
3. a raw baseline: plain aio-pika publishes with confirms (1,000 in flight) of the very
   same payload bytes to a quorum queue, and a plain consumer that inserts batches of up
   to 500 with asyncpg, one transaction each, then acks; and the same paced at step 2's
   rate;
4. the floor (``bench/upward_floor.py``; ``--no-floor`` leaves it out): that raw pipeline
   with the register's SQLite outbox and central's acks back, at step 2's rate.

It prints one JSON object on stdout; progress goes to stderr. Nothing is asserted: it
reports (see docs/performance.md for the figures and their caveats).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from _setup import (
    CentralProcess,
    CpuSample,
    Sandbox,
    Services,
    cores_used,
    cpu_sample,
    delete_users,
    documents_table,
    latency_summary,
    machine,
    percentile,
    progress,
    run_and_print,
    sandbox,
    services_from_env,
    stop_child,
    submit_all,
)
from _setup import _proc_cpu_s as process_cpu_s
from tillsync_agent import Agent, load_settings
from tillsync_agent.logs import configure_logging
from tillsync_agent.process import shorten_switch_interval, tune_gc
from tillsync_agent.simulator import Till
from tillsync_agent.store import open_readonly
from tillsync_central.management import Management
from tillsync_central.provisioning import Enrollment, add_register
from tillsync_protocol import topology
from upward_floor import floor

CENTER_ID = "bench"
DRAIN_TIMEOUT_S = 60.0
POLL_S = 0.005


# -- the registers --------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentStatus:
    last_seq: int
    pending: int
    rejected: int
    reconnects: int


class OutboxFile:
    """What the bench reads from a register's outbox file, wherever its agent runs."""

    register_id: str
    database_path: Path

    def timings(self, first_seq: int, last_seq: int) -> list[tuple[int, int | None, int]]:
        """``(created_at, last_sent_at, acked_at)`` in ms of the acknowledged rows in a seq
        range. ``last_sent_at`` is when the sender recorded the broker's confirms of the
        publish batch; None when central's ack got there first (the row was no longer
        open when the sender marked its batch published)."""
        with contextlib.closing(open_readonly(self.database_path)) as db:
            rows = db.execute(
                "SELECT created_at, last_sent_at, acked_at FROM outbox "
                "WHERE seq BETWEEN ? AND ? AND state = 'acknowledged'",
                (first_seq, last_seq),
            ).fetchall()
        return [(int(c), None if s is None else int(s), int(a)) for c, s, a in rows]

    def open_rows(self) -> int:
        """Rows neither acknowledged nor rejected, as the outbox table has them."""
        with contextlib.closing(open_readonly(self.database_path)) as db:
            row = db.execute(
                "SELECT count(*) FROM outbox WHERE state IN ('pending', 'published')"
            ).fetchone()
        return int(row[0])

    def payloads(self, last_seq: int) -> list[tuple[int, bytes]]:
        with contextlib.closing(open_readonly(self.database_path)) as db:
            rows = db.execute(
                "SELECT seq, payload FROM outbox WHERE seq <= ? ORDER BY seq", (last_seq,)
            ).fetchall()
        return [(int(seq), bytes(payload)) for seq, payload in rows]


@dataclass
class Register(OutboxFile):
    """An agent in the bench's own process and event loop."""

    agent: Agent
    till: Till
    task: asyncio.Task[None] | None = None
    docs: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.register_id = self.agent.settings.register_id
        self.database_path = self.agent.settings.database_path

    def generate(self, count: int) -> None:
        """Documents made ahead of the clock: the simulator's cost is not measured."""
        self.docs = [self.till.next_document() for _ in range(count)]

    async def submit_all(self, concurrency: int) -> None:
        await submit_all(self.agent.submit, self.docs, concurrency)

    def status(self) -> AgentStatus:
        counts = self.agent.outbox.counts
        return AgentStatus(
            counts.last_seq, counts.pending, counts.rejected, self.agent.link.state.reconnects
        )


@dataclass
class ChildRegister(OutboxFile):
    """An agent in a child process of its own (``bench/_agent_child.py``), driven by JSON
    lines on its stdin and answering on its stdout; the bench reads its outbox file."""

    register_id: str
    process: asyncio.subprocess.Process
    database_path: Path = Path()

    async def call(self, command: str, **fields: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"cmd": command, **fields}) + "\n").encode())
        await self.process.stdin.drain()
        return await self.answer()

    async def answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            code = await self.process.wait()
            raise RuntimeError(f"agent process of {self.register_id} exited {code}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"agent process of {self.register_id}: {reply.get('error')}")
        return reply

    async def status(self) -> AgentStatus:
        reply = await self.call("status")
        return AgentStatus(
            int(reply["last_seq"]),
            int(reply["pending"]),
            int(reply["rejected"]),
            int(reply["reconnects"]),
        )

    async def stop(self) -> None:
        await stop_child(self.process, grace_s=30)


class Fleet:
    """The R registers' agents, in this process or each in its own (``--agent-processes``)."""

    registers: Sequence[OutboxFile]

    def agent_pids(self) -> list[int]:
        """The agents' own processes (none when they run in this one)."""
        return []

    async def generate(self, counts: Sequence[int]) -> None:
        raise NotImplementedError

    async def submit_all(self, concurrency: int) -> None:
        raise NotImplementedError

    async def submit_paced(self, rate: float) -> float:
        """Submit the generated documents at ``rate`` documents/s in all, document k of the
        run to register k mod R; returns the seconds it took."""
        raise NotImplementedError

    async def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        """Until no agent has anything pending; False on timeout."""
        raise NotImplementedError

    async def status(self) -> dict[str, AgentStatus]:
        raise NotImplementedError


class InProcessFleet(Fleet):
    def __init__(self, registers: Sequence[Register]) -> None:
        self.registers = self.local = list(registers)

    async def generate(self, counts: Sequence[int]) -> None:
        for register, count in zip(self.local, counts, strict=True):
            register.generate(count)

    async def submit_all(self, concurrency: int) -> None:
        async with asyncio.TaskGroup() as group:
            for register in self.local:
                group.create_task(register.submit_all(concurrency))

    async def submit_paced(self, rate: float) -> float:
        # Round robin: register i gets documents i, i + R, i + 2R… (as _shares counted).
        registers = self.local
        queues = [iter(r.docs) for r in registers]
        total = sum(len(r.docs) for r in registers)
        loop = asyncio.get_running_loop()
        start = loop.time()
        sent = 0
        async with asyncio.TaskGroup() as group:
            while sent < total:
                due = min(total, int((loop.time() - start) * rate) + 1)
                while sent < due:
                    index = sent % len(registers)
                    group.create_task(registers[index].agent.submit(*next(queues[index])))
                    sent += 1
                await asyncio.sleep(0.002)
        return loop.time() - start

    async def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        deadline = time.monotonic() + timeout
        while any(r.agent.outbox.counts.pending for r in self.local):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    async def status(self) -> dict[str, AgentStatus]:
        return {r.register_id: r.status() for r in self.local}


class ChildFleet(Fleet):
    def __init__(self, registers: Sequence[ChildRegister]) -> None:
        self.registers = self.children = list(registers)

    def agent_pids(self) -> list[int]:
        return [child.process.pid for child in self.children]

    async def _each(self, command: str, **fields: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(c.call(command, **fields) for c in self.children)))

    async def generate(self, counts: Sequence[int]) -> None:
        await asyncio.gather(
            *(c.call("generate", count=n) for c, n in zip(self.children, counts, strict=True))
        )

    async def submit_all(self, concurrency: int) -> None:
        await self._each("submit_all", concurrency=concurrency)

    async def submit_paced(self, rate: float) -> float:
        # Register i submits its k-th document at (i + k·R) / rate: the same instants as
        # the in-process round robin, each on its own clock (started within a millisecond).
        count = len(self.children)
        start = time.perf_counter()
        await asyncio.gather(
            *(
                c.call("submit_paced", rate=rate / count, offset_s=i / rate)
                for i, c in enumerate(self.children)
            )
        )
        return time.perf_counter() - start

    async def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> bool:
        return all(reply["drained"] for reply in await self._each("drain", timeout_s=timeout))

    async def status(self) -> dict[str, AgentStatus]:
        statuses = await asyncio.gather(*(c.status() for c in self.children))
        return {c.register_id: s for c, s in zip(self.children, statuses, strict=True)}


def _load_agent_settings(enrollment: Enrollment, data_dir: Path) -> dict[str, Any]:
    """What both modes give an agent: the production defaults (ack timeout 30 s, 1,000
    in flight, ``synchronous=FULL``), the enrollment's identity and broker URL."""
    return {
        "register_id": enrollment.register_id,
        "center_id": enrollment.center_id,
        "amqp_url": enrollment.amqp_url,
        "data_dir": data_dir / enrollment.register_id,
    }


@contextlib.asynccontextmanager
async def running_registers(
    enrollments: Sequence[Enrollment], data_dir: Path
) -> AsyncIterator[InProcessFleet]:
    """In-process agents, each running until the block ends, then stopped as SIGTERM
    stops one."""
    async with contextlib.AsyncExitStack() as stack:
        registers: list[Register] = []
        for index, enrollment in enumerate(enrollments):
            settings = load_settings(None, **_load_agent_settings(enrollment, data_dir))
            agent = await stack.enter_async_context(Agent(settings, serve_socket=False))
            register = Register(agent, Till(enrollment.register_id, seed=index))
            register.task = asyncio.create_task(agent.run())
            stack.push_async_callback(_stop_agent, register)
            registers.append(register)
        await _wait_linked(registers)
        yield InProcessFleet(registers)


CHILD = Path(__file__).with_name("_agent_child.py")


@contextlib.asynccontextmanager
async def agent_processes(
    enrollments: Sequence[Enrollment], data_dir: Path
) -> AsyncIterator[ChildFleet]:
    """One child process per agent (``_agent_child.py``), as registers run in production;
    each stopped at the end of the block (also on an error or a cancel), none left behind."""
    children: list[ChildRegister] = []
    try:
        for index, enrollment in enumerate(enrollments):
            config = {**_load_agent_settings(enrollment, data_dir), "seed": index}
            config["data_dir"] = str(config["data_dir"])
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(CHILD),
                json.dumps(config),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 20,
                # Not in the terminal's process group: Ctrl-C reaches the bench alone,
                # which stops them in order (and if it dies, they read the end of stdin).
                process_group=0,
            )
            children.append(ChildRegister(enrollment.register_id, process))
        for child in children:
            ready = await asyncio.wait_for(child.answer(), timeout=60)
            child.database_path = Path(ready["database_path"])
        yield ChildFleet(children)
    finally:
        stopping = asyncio.gather(*(child.stop() for child in children), return_exceptions=True)
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:
            # Cancelled again (a second Ctrl-C): wait still. Should this wait be cut short
            # too, the children read the end of their stdin when this process exits.
            await stopping
            raise


async def _stop_agent(register: Register) -> None:
    register.agent.stop()
    if register.task is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(register.task, timeout=30)


async def _wait_linked(registers: Sequence[Register]) -> None:
    deadline = time.monotonic() + 30
    while not all(r.agent.link.state.connected for r in registers):
        if time.monotonic() > deadline:
            raise RuntimeError("agents did not connect within 30 s")
        await asyncio.sleep(0.05)


def sample_cpu(fleet: Fleet, central_pid: int | None, database: str) -> CpuSample:
    """``cpu_sample``, plus the agents' processes summed as ``agents`` when they have their
    own (in-process, the agents are ``bench_process``)."""
    base = cpu_sample(central_pid, database)
    pids = fleet.agent_pids()
    if not pids:
        return base
    return CpuSample(base.at, {**base.seconds, "agents": sum(process_cpu_s(p) for p in pids)})


# -- phase 1 and 2: tillsync ----------------------------------------------------------------


async def full_load(
    fleet: Fleet,
    docs: int,
    concurrency: int,
    central_pid: int | None,
    database: str,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Every register submits its share as fast as it is accepted; until all acked."""
    await fleet.generate(_shares(docs, len(fleet.registers)))
    progress(f"tillsync: submitting {docs} documents through {len(fleet.registers)} agents")
    cpu_before = sample_cpu(fleet, central_pid, database)
    began_at = time.time()
    start = time.perf_counter()
    await fleet.submit_all(concurrency)
    submitted_s = time.perf_counter() - start
    drained = await fleet.drain()
    wall_s = time.perf_counter() - start
    cpu = cores_used(cpu_before, sample_cpu(fleet, central_pid, database))
    last_seqs = {rid: s.last_seq for rid, s in (await fleet.status()).items()}
    timings = [t for r in fleet.registers for t in r.timings(1, last_seqs[r.register_id])]
    result = {
        "documents": docs,
        "drained": drained,
        "submit_s": round(submitted_s, 3),
        "submit_rate_per_s": round(docs / submitted_s, 1),
        "wall_s": round(wall_s, 3),
        "docs_per_s": round(docs / wall_s, 1),
        **breakdown(timings),
        "cores_used": cpu,
        "payload_bytes": _payload_sizes(fleet.registers, last_seqs),
        "window": (began_at, time.time()),
    }
    if not drained:
        result["stuck"] = await stuck(fleet)
    return result, last_seqs


async def stuck(fleet: Fleet) -> dict[str, Any]:
    """After a drain timeout: the pending counters against the outbox rows."""
    status = await fleet.status()
    return {
        r.register_id: {
            "pending_counter": status[r.register_id].pending,
            "open_rows": r.open_rows(),
        }
        for r in fleet.registers
    }


async def half_load(
    fleet: Fleet,
    rate: float,
    duration_s: float,
    after: dict[str, int],
    central_pid: int | None,
    database: str,
) -> dict[str, Any]:
    """Submit at ``rate`` documents/s (spread over the registers) for ``duration_s``."""
    total = max(1, int(rate * duration_s))
    await fleet.generate(_shares(total, len(fleet.registers)))
    progress(f"half load: {total} documents at {rate:.0f}/s for {duration_s:.0f} s")
    cpu_before = sample_cpu(fleet, central_pid, database)
    began_at = time.time()
    paced_s = await fleet.submit_paced(rate)
    cpu = cores_used(cpu_before, sample_cpu(fleet, central_pid, database))
    drained = await fleet.drain()
    last_seqs = {rid: s.last_seq for rid, s in (await fleet.status()).items()}
    timings = [
        t
        for r in fleet.registers
        for t in r.timings(after[r.register_id] + 1, last_seqs[r.register_id])
    ]
    result = {
        "target_rate_per_s": round(rate, 1),
        "achieved_rate_per_s": round(total / paced_s, 1),
        "documents": total,
        "duration_s": round(paced_s, 3),
        "drained": drained,
        **breakdown(timings),
        "cores_used_while_paced": cpu,
        "window": (began_at, time.time()),
    }
    if not drained:
        result["stuck"] = await stuck(fleet)
    return result


def breakdown(timings: Sequence[tuple[int, int | None, int]]) -> dict[str, Any]:
    """Submit→ack, and where it went: submit→publish batch confirmed (agent and broker)
    and confirmed→ack (central's batch and commit, the ack's way back), for the rows
    whose confirm was recorded before their ack."""
    marked = [(c, s, a) for c, s, a in timings if s is not None]
    return {
        "submit_to_ack": latency_summary([a - c for c, _, a in timings]),
        "submit_to_confirmed": latency_summary([s - c for c, s, _ in marked]),
        "confirmed_to_ack": latency_summary([a - s for _, s, a in marked]),
        "acked_before_marked_published": len(timings) - len(marked),
    }


def central_batches(log_path: Path, began_at: float, ended_at: float) -> dict[str, Any]:
    """Central's ingest batches logged within a phase (``batch committed``): how many, how
    large (deliveries, and documents: a ``document_batch`` is one delivery of several), and
    how long each spent in PostgreSQL (``store_ms``) and publishing its acks
    (``acks_ms``)."""
    sizes: list[int] = []
    documents: list[int] = []
    store_ms: list[float] = []
    acks_ms: list[float] = []
    for line in log_path.read_text(errors="replace").splitlines():
        if '"batch committed"' not in line:
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            event = json.loads(line)
            at = datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            if began_at <= at <= ended_at:
                sizes.append(int(event["size"]))
                documents.append(int(event["documents"]))
                store_ms.append(float(event["store_ms"]))
                acks_ms.append(float(event["acks_ms"]))
    return {
        "batches": len(sizes),
        "mean_size": round(sum(sizes) / len(sizes), 1) if sizes else None,
        "mean_documents": round(sum(documents) / len(documents), 1) if documents else None,
        "store": latency_summary(store_ms),
        "acks": latency_summary(acks_ms),
    }


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _payload_sizes(registers: Sequence[OutboxFile], last_seqs: dict[str, int]) -> dict[str, Any]:
    sizes = sorted(
        len(payload) for r in registers for _, payload in r.payloads(last_seqs[r.register_id])
    )
    return {
        "min": sizes[0] if sizes else None,
        "p50": percentile(sizes, 50),
        "max": sizes[-1] if sizes else None,
        "mean": round(sum(sizes) / len(sizes), 1) if sizes else None,
    }


async def invariant(pool: asyncpg.Pool, last_seqs: dict[str, int]) -> dict[str, Any]:
    """What central stored, against what the outboxes hold: each seq exactly once."""
    expected = sum(last_seqs.values())
    row = await pool.fetchrow(
        "SELECT count(*) AS stored, count(DISTINCT (register_id, seq)) AS keys, "
        "count(DISTINCT doc_id) AS doc_ids FROM documents"
    )
    assert row is not None  # an aggregate always returns its row
    missing = 0
    for register_id, last_seq in last_seqs.items():
        present = await pool.fetchval(
            "SELECT count(*) FROM documents WHERE register_id = $1 AND seq BETWEEN 1 AND $2",
            register_id,
            last_seq,
        )
        missing += last_seq - int(present)
    conflicts = await pool.fetchval("SELECT count(*) FROM conflicts")
    dead_letters = await pool.fetchval("SELECT count(*) FROM dead_letters")
    return {
        "submitted": expected,
        "stored": int(row["stored"]),
        "duplicates": int(row["stored"]) - min(int(row["keys"]), int(row["doc_ids"])),
        "missing": missing,
        "conflicts": int(conflicts),
        "dead_letters": int(dead_letters),
        "ok": int(row["stored"]) == expected and missing == 0,
    }


# -- phase 3: the raw baseline --------------------------------------------------------------

BASELINE_QUEUE = "bench.baseline"
BASELINE_TABLE, BASELINE_INSERT = documents_table("bench_baseline")


@dataclass
class BaselineConsumer:
    """A plain consumer: batches of what has arrived (up to ``batch_size``), one
    transaction each, then one multiple-ack."""

    pool: asyncpg.Pool
    expected: int
    published_at: dict[str, float]
    batch_size: int
    latencies_ms: list[float] = field(default_factory=list)
    committed: int = 0
    batches: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage]) -> None:
        while self.committed < self.expected:
            batch = [await inbox.get()]
            while len(batch) < self.batch_size and not inbox.empty():
                batch.append(inbox.get_nowait())
            keys = [str(m.message_id).split(":") for m in batch]
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    BASELINE_INSERT,
                    [k[0] for k in keys],
                    [int(k[1]) for k in keys],
                    [bytes(m.body) for m in batch],
                )
            now = time.perf_counter()
            for message in batch:
                self.latencies_ms.append((now - self.published_at[str(message.message_id)]) * 1e3)
            await batch[-1].ack(multiple=True)
            self.committed += len(batch)
            self.batches += 1
        self.done.set()


async def _baseline_paced(
    pool: asyncpg.Pool,
    channel: aio_pika.abc.AbstractChannel,
    routing_key: str,
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
    messages: Sequence[tuple[str, int, bytes]],
    rate: float,
    duration_s: float,
) -> dict[str, Any]:
    """The raw pipeline at tillsync's half-load rate, as long: the floor its latency
    target can be judged against on the machine as it is during the run."""
    await pool.execute("TRUNCATE bench_baseline")
    todo = messages[: max(1, min(len(messages), int(rate * duration_s)))]
    progress(f"baseline half load: {len(todo)} messages at {rate:.0f}/s")
    published_at: dict[str, float] = {}
    consumer = BaselineConsumer(pool, len(todo), published_at, batch_size=500)
    consuming = asyncio.create_task(consumer.run(inbox))
    exchange = channel.default_exchange
    loop = asyncio.get_running_loop()
    start = loop.time()
    sent = 0
    async with asyncio.TaskGroup() as group:
        while sent < len(todo):
            due = min(len(todo), int((loop.time() - start) * rate) + 1)
            while sent < due:
                register_id, seq, payload = todo[sent]
                message_id = f"{register_id}:{seq}"
                published_at[message_id] = time.perf_counter()
                message = aio_pika.Message(
                    payload, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message_id
                )
                group.create_task(exchange.publish(message, routing_key, timeout=30))
                sent += 1
            await asyncio.sleep(0.002)
    await asyncio.wait_for(consumer.done.wait(), timeout=DRAIN_TIMEOUT_S)
    await consuming
    return {
        "rate_per_s": round(rate, 1),
        "documents": len(todo),
        "publish_to_commit": latency_summary(consumer.latencies_ms),
        "mean_batch": round(consumer.committed / max(1, consumer.batches), 1),
    }


async def baseline(
    box: Sandbox,
    messages: Sequence[tuple[str, int, bytes]],
    in_flight: int,
    prefetch: int,
    paced_rate: float | None = None,
    paced_s: float = 8.0,
) -> dict[str, Any]:
    progress(f"baseline: {len(messages)} messages, {in_flight} in flight, prefetch {prefetch}")
    pool = await asyncpg.create_pool(box.database_url, min_size=1, max_size=2)
    publisher = await aio_pika.connect(box.amqp_url, timeout=15)
    consumer_conn = await aio_pika.connect(box.amqp_url, timeout=15)
    try:
        await pool.execute(BASELINE_TABLE)
        channel = await publisher.channel(publisher_confirms=True)
        queue = await channel.declare_queue(
            BASELINE_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        consume_channel = await consumer_conn.channel()
        await consume_channel.set_qos(prefetch_count=prefetch)
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await (await consume_channel.get_queue(BASELINE_QUEUE)).consume(inbox.put)
        published_at: dict[str, float] = {}
        consumer = BaselineConsumer(pool, len(messages), published_at, batch_size=500)
        consuming = asyncio.create_task(consumer.run(inbox))
        cpu_before = cpu_sample(None, box.name)
        start = time.perf_counter()
        publish_s = await _publish_all(channel, queue.name, messages, in_flight, published_at)
        await asyncio.wait_for(consumer.done.wait(), timeout=DRAIN_TIMEOUT_S)
        wall_s = time.perf_counter() - start
        cpu = cores_used(cpu_before, cpu_sample(None, box.name))
        del cpu["central"]
        await consuming
        stored = await pool.fetchval("SELECT count(*) FROM bench_baseline")
        paced = None
        if paced_rate:
            paced = await _baseline_paced(
                pool, channel, queue.name, inbox, messages, paced_rate, paced_s
            )
        return {
            "documents": len(messages),
            "publish_s": round(publish_s, 3),
            "publish_rate_per_s": round(len(messages) / publish_s, 1),
            "wall_s": round(wall_s, 3),
            "docs_per_s": round(len(messages) / wall_s, 1),
            "publish_to_commit": latency_summary(consumer.latencies_ms),
            "batches": consumer.batches,
            "mean_batch": round(consumer.committed / max(1, consumer.batches), 1),
            "cores_used": cpu,
            "stored": int(stored),
            "half_load": paced,
        }
    finally:
        await consumer_conn.close()
        await publisher.close()
        await pool.close()


async def _publish_all(
    channel: aio_pika.abc.AbstractChannel,
    routing_key: str,
    messages: Sequence[tuple[str, int, bytes]],
    in_flight: int,
    published_at: dict[str, float],
) -> float:
    """Publish everything with confirms, at most ``in_flight`` unconfirmed at a time."""
    window = asyncio.Semaphore(in_flight)
    exchange = channel.default_exchange
    start = time.perf_counter()

    async def publish(register_id: str, seq: int, payload: bytes) -> None:
        async with window:
            message_id = f"{register_id}:{seq}"
            published_at[message_id] = time.perf_counter()
            await exchange.publish(
                aio_pika.Message(
                    payload,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=message_id,
                ),
                routing_key,
                timeout=30,
            )

    async with asyncio.TaskGroup() as group:
        for register_id, seq, payload in messages:
            group.create_task(publish(register_id, seq, payload))
    return time.perf_counter() - start


# -- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    docs: int
    registers: int
    workers: int
    concurrency: int
    half_load_s: float
    half_load_rate: float | None
    in_flight: int
    prefetch: int
    batch_max_wait_ms: int | None
    profile_dir: Path | None
    json_only: bool
    agent_processes: bool = False
    floor: bool = True


async def run_tillsync(
    options: Options, services: Services, box: Sandbox, work: Path
) -> dict[str, Any]:
    """Phases 1 and 2, then the invariant; returns the figures and the payloads used."""
    extra_env = {}
    if options.batch_max_wait_ms is not None:
        extra_env["TILLSYNC_INGEST_BATCH_MAX_WAIT_MS"] = str(options.batch_max_wait_ms)
    central = CentralProcess(
        services,
        box,
        options.workers,
        work / "central.log",
        extra_env,
        None if options.profile_dir is None else options.profile_dir / "central.pstats",
    )
    run_id = box.name.rsplit("_", 1)[-1][:6]
    register_ids = [f"b{run_id}-r{i + 1}" for i in range(options.registers)]
    users = [topology.register_username(r) for r in register_ids]
    pool = await asyncpg.create_pool(box.database_url, min_size=1, max_size=2)
    try:
        progress(f"central: tillsync-central run --workers {options.workers}")
        await central.start()
        async with Management(services.api_url, box.name) as management:
            enrollments = [
                await add_register(pool, management, box.amqp_url, CENTER_ID, register_id)
                for register_id in register_ids
            ]
        agents = agent_processes if options.agent_processes else running_registers
        async with agents(enrollments, work / "agents") as fleet:
            pid = None if central.process is None else central.process.pid
            full, last_seqs = await full_load(
                fleet, options.docs, options.concurrency, pid, box.name
            )
            progress(f"tillsync: {full['docs_per_s']} docs/s")
            rate = options.half_load_rate or full["docs_per_s"] / 2
            half = await half_load(fleet, rate, options.half_load_s, last_seqs, pid, box.name)
            status = await fleet.status()
            all_seqs = {register_id: s.last_seq for register_id, s in status.items()}
            rejected = sum(s.rejected for s in status.values())
            reconnects = sum(s.reconnects for s in status.values())
            payloads = [
                (r.register_id, seq, payload)
                for r in fleet.registers
                for seq, payload in r.payloads(last_seqs[r.register_id])
            ]
        exit_code = await central.stop()
        check = await invariant(pool, all_seqs)
        check["rejected_by_central"] = rejected
        check["resent_duplicates_seen_by_central"] = central.count_in_log(
            "duplicate document acknowledged again"
        )
        full["central_exit_code"] = exit_code
        full["central_batches"] = central.count_in_log("batch committed")
        for phase in (full, half):
            phase["central_batch"] = central_batches(central.log_path, *phase.pop("window"))
        # Another process restarting the broker or the database spoils the figures.
        disturbances = {
            "agent_reconnects": reconnects,
            "central_sessions_ended": central.count_in_log("consumer session ended"),
            "central_db_retries": central.count_in_log(
                "database unavailable, batch kept for retry"
            ),
        }
        return {
            "tillsync": full,
            "half_load": half,
            "invariant": check,
            "disturbances": disturbances,
            "payloads": payloads,
        }
    finally:
        await central.stop()
        await pool.close()
        with contextlib.suppress(Exception):
            await delete_users(services, users)


async def run(options: Options, services: Services) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tillsync-bench-") as tmp:
        async with sandbox(services) as box:
            info = await machine(services, box)
            results = await _profiled(options, run_tillsync(options, services, box, Path(tmp)))
            payloads = results.pop("payloads")
            raw = await baseline(
                box,
                payloads,
                options.in_flight,
                options.prefetch,
                results["half_load"]["target_rate_per_s"],
                options.half_load_s,
            )
            under = None
            if options.floor:
                rate = results["half_load"]["target_rate_per_s"]
                under = await floor(box, rate, options.half_load_s, options.registers)
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report(options, info, results, raw, under)


async def _profiled(options: Options, work: Any) -> dict[str, Any]:
    """Await ``work`` under cProfile when ``--profile DIR`` is given (the bench process:
    agents, submitters)."""
    if options.profile_dir is None:
        return dict(await work)
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        return dict(await work)
    finally:
        profile.disable()
        profile.dump_stats(options.profile_dir / "agents.pstats")


def report(
    options: Options,
    info: dict[str, Any],
    results: dict[str, Any],
    raw: dict[str, Any],
    under: dict[str, Any] | None,
) -> dict[str, Any]:
    tillsync, half = results["tillsync"], results["half_load"]
    ratio = tillsync["docs_per_s"] / raw["docs_per_s"] if raw["docs_per_s"] else None
    half_p99 = half["submit_to_ack"]["p99_ms"]
    check = results["invariant"]
    disturbances = results["disturbances"]
    undisturbed = not any(disturbances.values()) and tillsync["drained"] and half["drained"]
    return {
        "valid": undisturbed,
        "disturbances": disturbances,
        "tillsync": tillsync,
        "baseline": raw,
        "ratio_throughput": None if ratio is None else round(ratio, 3),
        "half_load": half,
        "floor": under,
        "stored": check["stored"],
        "duplicates": check["duplicates"],
        "invariant": check,
        "targets": {
            "throughput_at_least_half_of_baseline": {
                "met": ratio is not None and ratio >= 0.5,
                "ratio": None if ratio is None else round(ratio, 3),
                "tillsync_docs_per_s": tillsync["docs_per_s"],
                "baseline_docs_per_s": raw["docs_per_s"],
            },
            "p99_submit_to_ack_under_50ms_at_half_load": {
                # A rate given with --half-load-rate is for A/B runs, not for the target.
                "met": None
                if options.half_load_rate is not None
                else half_p99 is not None and half_p99 < 50 and half["drained"],
                "p99_ms": half_p99,
                "p50_ms": half["submit_to_ack"]["p50_ms"],
                "baseline_at_the_same_rate_p50_p99_ms": None
                if raw.get("half_load") is None
                else [
                    raw["half_load"]["publish_to_commit"]["p50_ms"],
                    raw["half_load"]["publish_to_commit"]["p99_ms"],
                ],
                # The raw pipeline with the register's outbox and acks (bench/upward_floor.py).
                "floor_at_the_same_rate_p50_p99_ms": None
                if under is None
                else [under["submit_to_ack"]["p50_ms"], under["submit_to_ack"]["p99_ms"]],
                "p99_over_floor": None
                if under is None or not half_p99 or not under["submit_to_ack"]["p99_ms"]
                else round(half_p99 / under["submit_to_ack"]["p99_ms"], 2),
            },
        },
        "config": {
            "docs": options.docs,
            "registers": options.registers,
            "agents": "one process each (--agent-processes)"
            if options.agent_processes
            else "all in the bench's process and event loop",
            "central_workers": options.workers,
            "submit_concurrency_per_agent": options.concurrency,
            "half_load_s": options.half_load_s,
            "half_load_rate": options.half_load_rate or "half the full-load throughput",
            "baseline_in_flight": options.in_flight,
            "baseline_prefetch": options.prefetch,
            "baseline_batch": 500,
            "ingest_batch_max_wait_ms": options.batch_max_wait_ms or "central default (2)",
            "agent_settings": "defaults (max_in_flight 1000, ack_timeout_s 30, synchronous=FULL)",
            # What the agents' settings resolve to (TILLSYNC_PUBLISH_BATCH_MAX=1 in the
            # environment: every document a message of its own).
            "publish_batch_max": load_settings(
                None, register_id="bench", center_id="bench"
            ).publish_batch_max,
        },
        "machine": info,
    }


def parse(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--docs", type=int, default=20_000, help="documents in the full-load run")
    parser.add_argument("--registers", type=int, default=4, help="registers (agents)")
    parser.add_argument("--workers", type=int, default=2, help="central's ingest workers")
    parser.add_argument("--concurrency", type=int, default=64, help="submits waiting per agent")
    parser.add_argument("--half-load-seconds", type=float, default=8.0, dest="half_load_s")
    parser.add_argument(
        "--half-load-rate",
        type=float,
        default=None,
        help="documents/s of the paced phase (default: half the full-load throughput just "
        "measured); a fixed rate compares two versions of the code at equal load",
    )
    parser.add_argument("--in-flight", type=int, default=1000, help="baseline unconfirmed")
    parser.add_argument("--prefetch", type=int, default=2000, help="baseline consumer prefetch")
    parser.add_argument(
        "--batch-max-wait-ms",
        type=int,
        default=None,
        help="pass TILLSYNC_INGEST_BATCH_MAX_WAIT_MS to central (default: its own, 2)",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, dest="profile_dir", help="write cProfile stats here"
    )
    parser.add_argument(
        "--agent-processes",
        action="store_true",
        help="run each register's agent in a child process of its own (bench/_agent_child.py), "
        "as registers run in production; default: all agents in this process",
    )
    parser.add_argument(
        "--no-floor",
        action="store_false",
        dest="floor",
        help="skip the floor: the raw pipeline with the register's outbox and acks at the "
        "half-load rate (bench/upward_floor.py)",
    )
    parser.add_argument("--json-only", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.docs < args.registers or args.registers < 1 or args.workers < 1:
        parser.error("need --registers >= 1, --workers >= 1 and --docs >= --registers")
    return Options(**vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    configure_logging("console", "warning")  # the agents' logs: stderr, warnings only
    if options.profile_dir is not None:
        options.profile_dir.mkdir(parents=True, exist_ok=True)
    progress.enabled = not options.json_only
    # The in-process agents live in a process tuned as `tillsync-agent run` tunes its own
    # (the raw baseline, in the same process, gets the same collector and switch interval).
    tune_gc()
    shorten_switch_interval()
    return run_and_print(run(options, services_from_env()))


if __name__ == "__main__":
    sys.exit(main())
