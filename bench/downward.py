"""Benchmark of the downward flow (issue #5): central's catalog → relay → registers' replicas.

    uv run python bench/downward.py [--registers 10,100,500] [--changes 20] [--json-only]

One run, on its own fresh vhost and database (created at start, dropped at the end, even
on Ctrl-C), with the real ``tillsync-central run`` as a subprocess and the agents in this
process, measures:

1. **fan-out**, for each N of ``--registers`` (ascending; registers are added as N grows,
   each provisioned through the management API, each agent with its own SQLite file and
   broker user): ``--changes`` edits of one global item, each timed from the moment
   ``CatalogEditor.upsert`` returns (committed) until each replica has applied it (the
   agents' ``on_change`` callbacks); then the raw baseline for the same N: the very same
   message bytes published with plain aio-pika to a topic exchange with N bound queues
   (same queue type and arguments as a register's), one consumer connection per queue
   doing one plain ``sqlite3`` insert + commit per message, then the ack;
2. **reinit**: 100,000 items and 10,000 customers written into a center's scope with
   ``CatalogEditor`` (timed), one new register of that center (its start-up delta loads
   them all: timed too), then ``agent.reinit_catalog("replace", with_customers=True)`` end
   to end, against the raw pipeline: asyncpg reads the same rows, pages of the same size
   go through RabbitMQ to a queue, a consumer ``executemany``\\ s them into a plain SQLite
   table and commits.

The agents share one ``sqlite_gate`` of 32 places, as the raw consumers share 32 threads
(``--sqlite-gate N`` sets both; 0: no gate, the raw side keeps 32). Each agent's aiosqlite
connection has a thread of its own, and a thousand threads contending for this one
process's GIL cost several times the work itself (a till runs one agent per process; see
docs/agent.md).

``--fleet-processes K`` hosts the fan-out's agents, and the raw consumers alike, in K child
processes (``_fleet_child.py``) instead of this one: registers run one per till, and one
process's event loop is what paces a thousand of them here.

Every measurement starts with ``gc.collect()`` and ``gc.freeze()`` (``--no-gc-freeze``:
not): hundreds of registers share this process's heap, where each would have its own.

It prints one JSON object on stdout; progress goes to stderr. Nothing is asserted: it
reports (see docs/performance.md for the figures and their caveats).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import resource
import sqlite3
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import msgpack

from _setup import (
    PROBE_KEY,
    RAW_CHANGES_TABLE,
    CentralProcess,
    CpuSample,
    Sandbox,
    Services,
    cores_used,
    cpu_sample,
    delete_users,
    insert_change,
    latency_summary,
    machine,
    open_sqlite,
    percentile,
    probe_state,
    progress,
    run_and_print,
    sandbox,
    services_from_env,
    stop_child,
)
from tillsync_agent import Agent, load_settings
from tillsync_agent.catalog_events import CatalogEvent
from tillsync_agent.delta_rpc import SyncProgress
from tillsync_agent.logs import configure_logging
from tillsync_agent.process import GC_THRESHOLDS, shorten_switch_interval
from tillsync_agent.store import open_readonly
from tillsync_central.catalog import CatalogEditor, prepare_edit
from tillsync_central.db import init_connection
from tillsync_central.management import Management
from tillsync_central.provisioning import Enrollment, add_register
from tillsync_central.relay import change_msg_id
from tillsync_protocol import (
    CONTENT_TYPE,
    GLOBAL_SCOPE,
    CatalogChange,
    CatalogChangeBody,
    encode,
    topology,
)

FANOUT_CENTER = "bench"
REINIT_CENTER = "bench-reinit"
WAIT_S = 30.0
START_TIMEOUT_S = 180.0
PAUSE_S = 0.05
"""Between two measured changes: the previous one's acks and writes settle."""
AGENT_OPEN_CONCURRENCY = 50
RAW_FANOUT_EXCHANGE = "bench.fanout"
RAW_REINIT_QUEUE = "bench.reinit"
CENTRAL_DISTURBANCES = (
    "consumer session ended",
    "relay session ended",
    "database unavailable, request kept for retry",
)
FLEET_CHILD = Path(__file__).with_name("_fleet_child.py")
SQLITE_THREADS = 32
"""The default of ``--sqlite-gate``: the places of the agents' shared ``sqlite_gate`` and
the threads the raw consumers' sqlite3 calls run in (both sides run at most this many
SQLite calls at once; with ``--sqlite-gate 0`` the agents run unbounded, the raw side on
this many threads)."""


# -- SQLite, as the agent sets it up (WAL, synchronous=FULL) --------------------------------


RAW_CATALOG_TABLE = """
CREATE TABLE IF NOT EXISTS catalog (
    entity TEXT NOT NULL, key TEXT NOT NULL, scope TEXT NOT NULL, version INTEGER NOT NULL,
    scope_seq INTEGER NOT NULL, state TEXT NOT NULL, PRIMARY KEY (entity, key, scope)
)
"""
RAW_CATALOG_INSERT = "INSERT INTO catalog VALUES (?, ?, ?, ?, ?, ?)"


class GcPauses:
    """The garbage collector's pauses of this process (``gc.callbacks``): with hundreds of
    agents in one process a full collection walks all their objects and stalls them all."""

    def __init__(self) -> None:
        self._started = 0.0
        self._pauses: list[tuple[int, float]] = []

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._pauses.append((info["generation"], time.perf_counter() - self._started))

    def settle(self, freeze: bool) -> None:
        """Before a measurement: collect, then (``freeze``) move every object alive now
        out of the collector's sight (``gc.freeze``). Each register is a process of its
        own in a deployment; here hundreds share one heap, and without this every full
        collection walks all of them while every one of them waits."""
        gc.collect()
        if freeze:
            gc.freeze()

    def take(self) -> dict[str, Any]:
        """What was paused since the last call."""
        pauses, self._pauses = self._pauses, []
        full = [seconds for generation, seconds in pauses if generation == 2]
        return {
            "collections": len(pauses),
            "total_ms": round(sum(seconds for _, seconds in pauses) * 1e3, 1),
            "full": len(full),
            "max_ms": round(max((seconds for _, seconds in pauses), default=0.0) * 1e3, 1),
        }


def merge_gc_pauses(takes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """:meth:`GcPauses.take` of several processes as one: counts and times added (each
    process pauses only its own agents), the longest pause of all."""
    return {
        "collections": sum(t["collections"] for t in takes),
        "total_ms": round(sum(t["total_ms"] for t in takes), 1),
        "full": sum(t["full"] for t in takes),
        "max_ms": max((t["max_ms"] for t in takes), default=0.0),
        "processes": len(takes),
    }


# -- the registers --------------------------------------------------------------------------


class Probe:
    """Who applied which version of the probe item, and when (``perf_counter``)."""

    def __init__(self) -> None:
        self.arrivals: dict[int, dict[int, float]] = defaultdict(dict)
        self.sources: Counter[str] = Counter()
        self._arrived = asyncio.Event()

    def callback(self, index: int) -> Callable[[CatalogEvent], None]:
        def on_change(event: CatalogEvent) -> None:
            if event.entity == "items" and event.key == PROBE_KEY and event.version is not None:
                self.record(event.version, index, time.perf_counter(), event.source)

        return on_change

    def record(self, version: int, index: int, at: float, source: str) -> None:
        """Replica ``index`` applied ``version`` at ``at`` (``perf_counter``: the system's
        monotonic clock, the same in every process of this machine)."""
        self.arrivals[version].setdefault(index, at)
        self.sources[source] += 1
        self._arrived.set()

    async def wait(self, version: int, count: int, timeout: float = WAIT_S) -> dict[int, float]:
        """Until ``count`` replicas have ``version`` (or the timeout): who had it, when."""
        deadline = time.monotonic() + timeout
        while len(self.arrivals[version]) < count and time.monotonic() < deadline:
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), deadline - time.monotonic())
        return dict(self.arrivals[version])


@dataclass
class Fleet:
    """In-process agents with the production defaults, each with its own data directory
    and broker user; stopped together as SIGTERM stops one."""

    data_dir: Path
    sqlite_gate: int
    """0: none (every agent's thread contends for the GIL whenever it has work)."""
    probe: Probe = field(default_factory=Probe)
    agents: list[Agent] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    _shared: asyncio.Semaphore | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.sqlite_gate:
            self._shared = asyncio.Semaphore(self.sqlite_gate)

    @property
    def size(self) -> int:
        return len(self.agents)

    async def start(self) -> None:
        """The agents live in this process: nothing to start."""

    def pids(self) -> list[int]:
        """Processes besides this one that host agents: none."""
        return []

    def database_paths(self) -> list[Path]:
        return [agent.settings.database_path for agent in self.agents]

    async def add(
        self,
        enrollments: Sequence[Enrollment],
        indices: Sequence[int] | None = None,
        **settings: Any,
    ) -> list[Agent]:
        """Open and run an agent per enrollment (reporting to the probe as ``indices``,
        by default their places in the fleet); returns them once every one is linked and
        has finished its start-up delta."""
        gate = asyncio.Semaphore(AGENT_OPEN_CONCURRENCY)

        async def open_one(enrollment: Enrollment) -> Agent:
            agent = Agent(
                load_settings(
                    None,
                    register_id=enrollment.register_id,
                    center_id=enrollment.center_id,
                    amqp_url=enrollment.amqp_url,
                    data_dir=self.data_dir / enrollment.register_id,
                    **settings,
                ),
                serve_socket=False,
                sqlite_gate=self._shared,
            )
            async with gate:
                await agent.__aenter__()
            self.stack.push_async_exit(agent)
            return agent

        added = list(await asyncio.gather(*(open_one(e) for e in enrollments)))
        if indices is None:
            indices = range(len(self.agents), len(self.agents) + len(added))
        for agent, index in zip(added, indices, strict=True):
            agent.on_change(self.probe.callback(index))
            self.agents.append(agent)
            self.tasks.append(asyncio.create_task(agent.run()))
        await _wait_started(added)
        return added

    async def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 60)
        await self.stack.aclose()
        self.agents.clear()
        self.tasks.clear()

    async def reconnects(self) -> int:
        return sum(agent.link.state.reconnects for agent in self.agents)

    async def settle(self, freeze: bool) -> None:
        """The agents live in this process: its own ``GcPauses`` settles them."""

    async def gc_take(self) -> list[dict[str, Any]]:
        return []

    @contextlib.asynccontextmanager
    async def raw_consumers(
        self, amqp_url: str, n: int, work: Path, threads: int, on_arrival: ArrivalCallback
    ) -> AsyncIterator[None]:
        """The raw baseline's consumers of queues 0..n-1, where the agents live."""
        consumers = RawConsumers(amqp_url, work, min(n, threads), on_arrival)
        try:
            await consumers.start(range(n))
            yield
        finally:
            await consumers.close()


class FleetProcess:
    """One child process of a :class:`ProcessFleet` (``bench/_fleet_child.py``): commands
    as JSON lines on its stdin; on its stdout, one reply per command, between lines of
    arrivals (which this routes as they come)."""

    def __init__(
        self, number: int, process: asyncio.subprocess.Process, fleet: ProcessFleet
    ) -> None:
        self.number = number
        self.process = process
        self._fleet = fleet
        self._replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            message: dict[str, Any] = json.loads(line)
            if "arrivals" in message:
                for version, index, at, source in message["arrivals"]:
                    self._fleet.probe.record(version, index, at, source)
            elif "raw" in message:
                for msg_id, index, at in message["raw"]:
                    if self._fleet.on_raw is not None:
                        self._fleet.on_raw(msg_id, index, at)
            else:
                self._replies.put_nowait(message)
        self._replies.put_nowait({"ok": False, "error": "the process ended"})

    async def call(
        self, command: str, timeout: float = START_TIMEOUT_S, **fields: Any
    ) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps({"cmd": command, **fields}) + "\n").encode())
        await self.process.stdin.drain()
        reply = await asyncio.wait_for(self._replies.get(), timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"fleet process {self.number}, {command}: {reply.get('error')}")
        return reply

    async def stop(self) -> None:
        """Its 500 agents stop as SIGTERM stops one: a minute before SIGTERM."""
        await stop_child(self.process, grace_s=60)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reading, timeout=10)


class ProcessFleet:
    """The fan-out's agents spread round robin over ``processes`` child processes
    (``--fleet-processes``), each set up as this one (the switch interval, the GC
    thresholds, a ``sqlite_gate`` of its own); the raw baseline's consumers are spread the
    same way, so both sides get the same processes and threads."""

    def __init__(self, data_dir: Path, sqlite_gate: int, processes: int, gc_freeze: bool) -> None:
        self.probe = Probe()
        self.on_raw: ArrivalCallback | None = None
        self._config = {"data_dir": str(data_dir), "sqlite_gate": sqlite_gate,
                        "gc_freeze": gc_freeze}  # fmt: skip
        self._processes = processes
        self._children: list[FleetProcess] = []
        self._paths: dict[int, Path] = {}

    @property
    def size(self) -> int:
        return len(self._paths)

    def pids(self) -> list[int]:
        return [child.process.pid for child in self._children]

    def database_paths(self) -> list[Path]:
        return [self._paths[index] for index in sorted(self._paths)]

    async def start(self) -> None:
        for number in range(self._processes):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(FLEET_CHILD),
                json.dumps(self._config),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                limit=1 << 24,
                # Ctrl-C reaches the bench alone, which stops them in order (and should it
                # die, they read the end of their stdin).
                process_group=0,
            )
            self._children.append(FleetProcess(number, process, self))
        await asyncio.gather(*(child.call("ready") for child in self._children))

    async def add(self, enrollments: Sequence[Enrollment]) -> None:
        """Register ``size + k`` goes to process ``(size + k) mod processes``."""
        shares: dict[int, list[tuple[int, Enrollment]]] = defaultdict(list)
        for k, enrollment in enumerate(enrollments):
            index = self.size + k
            shares[index % self._processes].append((index, enrollment))

        async def add_share(child: FleetProcess) -> None:
            share = shares[child.number]
            if not share:
                return
            reply = await child.call(
                "add",
                indices=[index for index, _ in share],
                enrollments=[_enrollment_fields(e) for _, e in share],
            )
            for (index, _), path in zip(share, reply["database_paths"], strict=True):
                self._paths[index] = Path(path)

        await asyncio.gather(*(add_share(child) for child in self._children))

    async def _each(self, command: str, **fields: Any) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(c.call(command, **fields) for c in self._children)))

    async def reconnects(self) -> int:
        return sum(int(reply["reconnects"]) for reply in await self._each("reconnects"))

    async def settle(self, freeze: bool) -> None:
        await self._each("settle", freeze=freeze)

    async def gc_take(self) -> list[dict[str, Any]]:
        return [reply["gc"] for reply in await self._each("gc_take")]

    @contextlib.asynccontextmanager
    async def raw_consumers(
        self, amqp_url: str, n: int, work: Path, threads: int, on_arrival: ArrivalCallback
    ) -> AsyncIterator[None]:
        self.on_raw = on_arrival
        try:
            await asyncio.gather(
                *(
                    child.call(
                        "raw_start",
                        amqp_url=amqp_url,
                        work=str(work),
                        threads=threads,
                        indices=[i for i in range(n) if i % self._processes == child.number],
                    )
                    for child in self._children
                )
            )
            yield
        finally:
            with contextlib.suppress(Exception):
                await self._each("raw_stop")
            self.on_raw = None

    async def stop(self) -> None:
        stopping = asyncio.gather(*(c.stop() for c in self._children), return_exceptions=True)
        try:
            await asyncio.shield(stopping)
        except asyncio.CancelledError:
            await stopping
            raise


def _enrollment_fields(enrollment: Enrollment) -> dict[str, Any]:
    """What a fleet process needs to open the register's agent (sent on its stdin: the
    password stays off command lines)."""
    return {
        "register_id": enrollment.register_id,
        "center_id": enrollment.center_id,
        "broker_user": enrollment.broker_user,
        "password": enrollment.password,
        "amqp_url": enrollment.amqp_url,
    }


AnyFleet = Fleet | ProcessFleet


async def _wait_started(agents: Sequence[Agent]) -> None:
    """Until every agent is linked and its start-up delta has finished."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not all(
        a.link.state.connected and a.history.last is not None and a.catalog_sync.running is None
        for a in agents
    ):
        if time.monotonic() > deadline:
            late = sum(1 for a in agents if a.history.last is None)
            raise RuntimeError(f"{late} agents did not finish their start-up delta in time")
        await asyncio.sleep(0.05)


async def provision(
    pool: asyncpg.Pool,
    management: Management,
    box: Sandbox,
    center_id: str,
    register_ids: Sequence[str],
    concurrency: int,
) -> list[Enrollment]:
    """``add_register`` for each id, ``concurrency`` at a time (about ten management API
    calls each: queue, bindings, user, permissions, topic permissions)."""
    gate = asyncio.Semaphore(concurrency)

    async def one(register_id: str) -> Enrollment:
        async with gate:
            return await add_register(pool, management, box.amqp_url, center_id, register_id)

    return list(await asyncio.gather(*(one(r) for r in register_ids)))


# -- fan-out: tillsync ----------------------------------------------------------------------


@dataclass
class Timings:
    """Per change, each register's delay (ms) from the start of the change."""

    per_change: list[list[float]] = field(default_factory=list)
    missing: int = 0

    def summary(self) -> dict[str, Any]:
        pairs = [ms for delays in self.per_change for ms in delays]
        return {
            "changes": len(self.per_change),
            "missing": self.missing,
            "each_register": latency_summary(pairs),
            "slowest_register": latency_summary([max(d) for d in self.per_change if d]),
            "first_register": latency_summary([min(d) for d in self.per_change if d]),
            "slowest_register_each_ms": [round(max(d), 1) for d in self.per_change if d],
        }


@dataclass
class FanoutRun:
    timings: Timings
    seqs: list[int]
    """scope_seq of each measured change."""
    commit_ms: list[float]
    """How long each ``upsert`` call took (the editor's transaction)."""
    committed_at: list[float]
    """When each ``upsert`` returned (``perf_counter``)."""
    last_version: int


async def tillsync_fanout(
    editor: CatalogEditor, fleet: AnyFleet, changes: int, price_base: int
) -> FanoutRun:
    """One warm-up change, then ``changes`` measured ones, one at a time."""
    timings = Timings()
    seqs: list[int] = []
    commit_ms: list[float] = []
    committed_at: list[float] = []
    count = fleet.size
    version = 0
    for i in range(changes + 1):
        started = time.perf_counter()
        change = await editor.upsert(GLOBAL_SCOPE, "items", PROBE_KEY, probe_state(price_base + i))
        committed = time.perf_counter()
        version = change.version
        arrived = await fleet.probe.wait(version, count)
        if i > 0:
            timings.per_change.append([(t - committed) * 1e3 for t in arrived.values()])
            timings.missing += count - len(arrived)
            seqs.append(change.scope_seq)
            commit_ms.append((committed - started) * 1e3)
            committed_at.append(committed)
        await asyncio.sleep(PAUSE_S)
    return FanoutRun(timings, seqs, commit_ms, committed_at, version)


@contextlib.asynccontextmanager
async def relay_tap(box: Sandbox) -> AsyncIterator[dict[str, float]]:
    """A queue of the bench's own, bound to ``tillsync.catalog`` like a register's: when
    each global change (by ``msg_id``) came out of the relay and through the broker."""
    arrivals: dict[str, float] = {}
    connection = await aio_pika.connect(box.amqp_url, timeout=15)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(topology.CATALOG_EXCHANGE, "cat.global.*")

        async def arrived(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            arrivals.setdefault(str(message.message_id), time.perf_counter())

        await queue.consume(arrived, no_ack=True)
        yield arrivals
    finally:
        await connection.close()


def relay_delays(run: FanoutRun, tap: dict[str, float]) -> dict[str, Any]:
    """From the editor's commit to the tap: NOTIFY, the relay's read, publish, routing."""
    delays = [
        (tap[msg_id] - committed) * 1e3
        for seq, committed in zip(run.seqs, run.committed_at, strict=True)
        if (msg_id := change_msg_id(GLOBAL_SCOPE, seq)) in tap
    ]
    return latency_summary(delays)


async def change_bodies(pool: asyncpg.Pool, seqs: Sequence[int]) -> list[tuple[str, bytes]]:
    """The bytes the relay published for these global changes (``msg_id`` is a uuid5 and
    ``created_at`` the change's time, so the encoding is byte-identical)."""
    rows = await pool.fetch(
        "SELECT scope_seq, entity, key, op, version, state, changed_at FROM catalog_changelog "
        "WHERE scope = $1 AND scope_seq = ANY($2::bigint[]) ORDER BY scope_seq",
        GLOBAL_SCOPE,
        list(seqs),
    )
    bodies = []
    for row in rows:
        changed_at: datetime = row["changed_at"]
        message = CatalogChange(
            msg_id=change_msg_id(GLOBAL_SCOPE, row["scope_seq"]),
            created_at=int(changed_at.timestamp() * 1000),
            body=CatalogChangeBody(
                scope=GLOBAL_SCOPE,
                scope_seq=row["scope_seq"],
                entity=row["entity"],
                key=row["key"],
                op=row["op"],
                version=row["version"],
                state=row["state"],
            ),
        )
        bodies.append((message.msg_id, encode(message)))
    return bodies


def replicas_hold(fleet: AnyFleet, version: int) -> dict[str, Any]:
    """Every replica's row of the probe item, read from its file: at ``version``?"""
    behind = 0
    paths = fleet.database_paths()
    for path in paths:
        with contextlib.closing(open_readonly(path)) as db:
            row = db.execute(
                "SELECT version FROM catalog WHERE entity = 'items' AND key = ? AND scope = ?",
                (PROBE_KEY, GLOBAL_SCOPE),
            ).fetchone()
        if row is None or int(row[0]) != version:
            behind += 1
    return {"replicas": len(paths), "at_final_version": len(paths) - behind}


# -- fan-out: the raw baseline --------------------------------------------------------------


ArrivalCallback = Callable[[str, int, float], None]
"""``(message_id, queue index, perf_counter)``: a raw consumer committed a message."""


@dataclass
class RawConsumer:
    """One queue, one connection, one SQLite file: insert + commit per message, then ack."""

    index: int
    db: sqlite3.Connection
    connection: aio_pika.abc.AbstractConnection | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class RawConsumers:
    """The raw baseline's consumers of some of the raw fan-out's queues, in this process:
    plain aio-pika (one connection each, prefetch 200) and plain ``sqlite3`` on a pool of
    ``threads`` threads."""

    def __init__(
        self, amqp_url: str, work: Path, threads: int, on_arrival: ArrivalCallback
    ) -> None:
        self._amqp_url = amqp_url
        self._work = work
        self._on_arrival = on_arrival
        self._executor = ThreadPoolExecutor(max_workers=max(1, threads))
        self._consumers: list[RawConsumer] = []

    async def start(self, indices: Sequence[int]) -> None:
        """Consume queues ``indices`` (declared by the publisher), each into its own file."""
        (self._work / "raw").mkdir(parents=True, exist_ok=True)
        consumers = [
            RawConsumer(i, open_sqlite(self._work / "raw" / f"{i}.sqlite3", RAW_CHANGES_TABLE))
            for i in indices
        ]
        self._consumers.extend(consumers)
        gate = asyncio.Semaphore(AGENT_OPEN_CONCURRENCY)

        async def start(consumer: RawConsumer) -> None:
            async with gate:
                await self._start(consumer)

        await asyncio.gather(*(start(c) for c in consumers))

    async def _start(self, consumer: RawConsumer) -> None:
        loop = asyncio.get_running_loop()
        consumer.connection = await aio_pika.connect(self._amqp_url, timeout=30)
        channel = await consumer.connection.channel()
        await channel.set_qos(prefetch_count=200)
        queue = await channel.get_queue(f"{RAW_FANOUT_EXCHANGE}.{consumer.index}")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            msg_id = str(message.message_id)
            async with consumer.lock:
                await loop.run_in_executor(
                    self._executor, insert_change, consumer.db, msg_id, message.body
                )
            self._on_arrival(msg_id, consumer.index, time.perf_counter())
            await message.ack()

        await queue.consume(on_message)

    async def close(self) -> None:
        await asyncio.gather(
            *(c.connection.close() for c in self._consumers if c.connection is not None),
            return_exceptions=True,
        )
        self._executor.shutdown(wait=True)
        for consumer in self._consumers:
            consumer.db.close()
        self._consumers.clear()


def _cpu_ms_per(before: CpuSample, after: CpuSample, deliveries: int) -> float:
    """CPU of the processes hosting the fleet (every thread: the agents' or the raw
    consumers' SQLite work included) per message delivered to one register."""
    spent = after.seconds["bench_process"] - before.seconds["bench_process"]
    return round(spent * 1e3 / max(1, deliveries), 3)


@dataclass(frozen=True)
class RawFanout:
    timings: Timings
    setup_s: float
    cpu_ms_per_delivery: float
    cores_used: dict[str, float]
    gc_pauses: dict[str, Any]


async def raw_fanout(
    ctx: Context,
    fleet: AnyFleet,
    n: int,
    bodies: Sequence[tuple[str, bytes]],
    gc_freeze: bool,
    threads: int,
) -> RawFanout:
    """Publish each body (the first one a warm-up) to a topic exchange with ``n`` bound
    queues and time its way into ``n`` SQLite files, consumed where the fleet lives."""
    box = ctx.box
    setup_started = time.perf_counter()
    arrivals: dict[str, dict[int, float]] = defaultdict(dict)
    arrived = asyncio.Event()

    def on_arrival(msg_id: str, index: int, at: float) -> None:
        arrivals[msg_id].setdefault(index, at)
        arrived.set()

    publisher = await aio_pika.connect(box.amqp_url, timeout=15)
    try:
        channel = await publisher.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            RAW_FANOUT_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for index in range(n):
            queue = await channel.declare_queue(
                f"{RAW_FANOUT_EXCHANGE}.{index}",
                durable=True,
                arguments=topology.register_queue_arguments(),
            )
            await queue.bind(exchange, "cat.global.*")
        async with fleet.raw_consumers(box.amqp_url, n, ctx.work, threads, on_arrival):
            setup_s = time.perf_counter() - setup_started
            timings = Timings()
            await ctx.settle(fleet, gc_freeze)
            cpu_before = ctx.cpu(fleet)
            for i, (msg_id, body) in enumerate([(f"warm-up-{n}", bodies[0][1]), *bodies]):
                key = f"{msg_id}/{n}"
                message = aio_pika.Message(
                    body,
                    content_type=CONTENT_TYPE,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=key,
                    type="catalog_change",
                    app_id="bench",
                )
                published = time.perf_counter()
                await exchange.publish(message, "cat.global.items", timeout=30)
                deadline = time.monotonic() + WAIT_S
                while len(arrivals[key]) < n and time.monotonic() < deadline:
                    arrived.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(arrived.wait(), deadline - time.monotonic())
                if i > 0:
                    timings.per_change.append(
                        [(t - published) * 1e3 for t in arrivals[key].values()]
                    )
                    timings.missing += n - len(arrivals[key])
                await asyncio.sleep(PAUSE_S)
            cpu_after = ctx.cpu(fleet)
            gc_pauses = await ctx.gc_take(fleet)
        cores = cores_used(cpu_before, cpu_after)
        del cores["central"]
        return RawFanout(
            timings,
            setup_s,
            _cpu_ms_per(cpu_before, cpu_after, n * (len(bodies) + 1)),
            cores,
            gc_pauses,
        )
    finally:
        await publisher.close()


# -- fan-out: one N after the other ---------------------------------------------------------


@dataclass(frozen=True)
class Context:
    services: Services
    box: Sandbox
    pool: asyncpg.Pool
    management: Management
    central: CentralProcess
    work: Path
    users: list[str]
    gc_pauses: GcPauses

    def cpu(self, fleet: AnyFleet | None = None) -> CpuSample:
        """CPU so far; ``bench_process`` counts the fleet's processes too."""
        pid = None if self.central.process is None else self.central.process.pid
        return cpu_sample(pid, self.box.name, () if fleet is None else fleet.pids())

    async def settle(self, fleet: AnyFleet, freeze: bool) -> None:
        """Before a measurement: collect (and freeze) here and where the fleet lives, and
        forget the pauses so far."""
        self.gc_pauses.settle(freeze)
        await fleet.settle(freeze)
        await self.gc_take(fleet)

    async def gc_take(self, fleet: AnyFleet) -> dict[str, Any]:
        """The collector's pauses since the last take, of this process and the fleet's."""
        return merge_gc_pauses([self.gc_pauses.take(), *await fleet.gc_take()])

    async def disturbances(self, fleet: AnyFleet) -> int:
        """Reconnects and lost sessions so far: a phase during which this grew was disturbed
        (another session restarted the broker or PostgreSQL)."""
        return await fleet.reconnects() + sum(
            self.central.count_in_log(event) for event in CENTRAL_DISTURBANCES
        )


async def fanout_phase(ctx: Context, options: Options, fleet: AnyFleet) -> list[dict[str, Any]]:
    async with relay_tap(ctx.box) as tap:
        return [await fanout_size(ctx, options, fleet, n, tap) for n in options.sizes]


async def fanout_size(
    ctx: Context, options: Options, fleet: AnyFleet, n: int, tap: dict[str, float]
) -> dict[str, Any]:
    """Grow the fleet to ``n`` registers, then measure tillsync and the raw baseline."""
    grown = await grow(ctx, options, fleet, n)
    progress(f"fan-out N={n}: {options.changes} changes")
    deliveries = n * (options.changes + 1)  # the warm-up change included
    disturbances = await ctx.disturbances(fleet)
    await ctx.settle(fleet, options.gc_freeze)
    cpu_before = ctx.cpu(fleet)
    editor = CatalogEditor(ctx.pool, changed_by="bench")
    ours = await tillsync_fanout(editor, fleet, options.changes, n * 1000)
    cpu_after = ctx.cpu(fleet)
    gc_pauses = await ctx.gc_take(fleet)
    check = replicas_hold(fleet, ours.last_version)
    bodies = await change_bodies(ctx.pool, ours.seqs)
    progress(f"fan-out N={n}: raw baseline")
    raw = await raw_fanout(ctx, fleet, n, bodies, options.gc_freeze, _raw_threads(options))
    result = _fanout_result(
        n, ours, raw.timings, cores_used(cpu_before, cpu_after), raw.cores_used, check
    )
    result |= {
        "disturbed": await ctx.disturbances(fleet) != disturbances,
        "commit_to_relayed": relay_delays(ours, tap),
        "gc_pauses": {"tillsync": gc_pauses, "raw": raw.gc_pauses},
        "bench_process_cpu_ms_per_delivery": {
            "tillsync": _cpu_ms_per(cpu_before, cpu_after, deliveries),
            "raw": raw.cpu_ms_per_delivery,
        },
        "message_bytes": sorted(len(body) for _, body in bodies)[len(bodies) // 2],
        **grown,
        "raw_setup_s": round(raw.setup_s, 2),
    }
    ours_s, raw_s = result["tillsync"]["slowest_register"], result["raw"]["slowest_register"]
    progress(
        f"fan-out N={n}: time to all, p50/p99: tillsync {ours_s['p50_ms']}/{ours_s['p99_ms']} "
        f"ms, raw {raw_s['p50_ms']}/{raw_s['p99_ms']} ms"
    )
    return result


async def grow(ctx: Context, options: Options, fleet: AnyFleet, n: int) -> dict[str, float]:
    """Provision and start registers until the fleet has ``n``; how long each step took."""
    run_id = ctx.box.name.rsplit("_", 1)[-1][:6]
    new_ids = [f"b{run_id}-f{i + 1}" for i in range(fleet.size, n)]
    ctx.users.extend(topology.register_username(r) for r in new_ids)
    progress(f"fan-out N={n}: provisioning {len(new_ids)} registers")
    started = time.perf_counter()
    enrollments = await provision(
        ctx.pool, ctx.management, ctx.box, FANOUT_CENTER, new_ids, options.provision_concurrency
    )
    provision_s = time.perf_counter() - started
    progress(f"fan-out N={n}: {provision_s:.1f} s; starting {len(new_ids)} agents")
    started = time.perf_counter()
    await fleet.add(enrollments)
    start_s = time.perf_counter() - started
    progress(f"fan-out N={n}: agents up (linked, start-up delta done) in {start_s:.1f} s")
    return {
        "provision_s": round(provision_s, 2),
        "provision_ms_per_register": round(provision_s * 1e3 / max(1, len(new_ids)), 1),
        "agents_start_s": round(start_s, 2),
    }


def _raw_threads(options: Options) -> int:
    return options.sqlite_gate or SQLITE_THREADS


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def _fanout_result(
    n: int,
    run: FanoutRun,
    raw: Timings,
    cpu: dict[str, float],
    raw_cpu: dict[str, float],
    check: dict[str, Any],
) -> dict[str, Any]:
    ours, theirs = run.timings.summary(), raw.summary()
    return {
        "registers": n,
        "tillsync": ours,
        "raw": theirs,
        "ratio": {
            name: {
                p: _ratio(ours[name][f"{p}_ms"], theirs[name][f"{p}_ms"]) for p in ("p50", "p99")
            }
            for name in ("each_register", "slowest_register")
        },
        "editor_upsert": latency_summary(run.commit_ms),
        "cores_used": {"tillsync": cpu, "raw": raw_cpu},
        "invariant": check
        | {"ok": check["at_final_version"] == n and run.timings.missing == 0 and not raw.missing},
    }


# -- reinit ---------------------------------------------------------------------------------


def _item(i: int) -> dict[str, Any]:
    return {
        "name": f"Article {i:06d}",
        "gross_price": 100 + (i * 37) % 99_900,
        "currency": "CZK",
        "tax_rate_id": "vat-21" if i % 5 else "vat-12",
        "category_id": f"cat-{i % 250}",
        "barcodes": [f"859{i:010d}"],
        "labels": [],
    }


def _customer(i: int) -> dict[str, Any]:
    return {
        "name": f"Customer {i:05d}",
        "card_no": f"C{i:08d}",
        "email": f"customer{i}@example.com",
        "discount_bp": (i % 4) * 250,
    }


async def load_catalog(
    pool: asyncpg.Pool, scope: str, items: int, customers: int, batch: int = 1000
) -> dict[str, Any]:
    """Write the rows with ``CatalogEditor.apply`` in transactions of ``batch`` (as
    ``catalog import`` does); validation and writing timed apart."""
    editor = CatalogEditor(pool, changed_by="bench")
    rows = [("items", f"i{i:06d}", _item(i)) for i in range(items)]
    rows += [("customers", f"c{i:05d}", _customer(i)) for i in range(customers)]
    prepare_s = write_s = 0.0
    for first in range(0, len(rows), batch):
        started = time.perf_counter()
        edits = [prepare_edit(scope, e, k, "upsert", s) for e, k, s in rows[first : first + batch]]
        prepared = time.perf_counter()
        await editor.apply(edits)
        write_s += time.perf_counter() - prepared
        prepare_s += prepared - started
    total = prepare_s + write_s
    return {
        "rows": len(rows),
        "batch": batch,
        "validate_s": round(prepare_s, 2),
        "write_s": round(write_s, 2),
        "total_s": round(total, 2),
        "rows_per_s": round(len(rows) / total),
    }


async def wait_relayed(pool: asyncpg.Pool, scope: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        behind = await pool.fetchval(
            "SELECT s.last_seq - COALESCE(p.published_seq, 0) FROM catalog_scopes s "
            "LEFT JOIN relay_positions p USING (scope) WHERE s.scope = $1",
            scope,
        )
        if not behind:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the relay is {behind} changes behind after {timeout:.0f} s")
        await asyncio.sleep(0.1)


@dataclass
class ProgressClock:
    """When a sync reached each phase (``perf_counter``)."""

    started: float = field(default_factory=time.perf_counter)
    first_page: float | None = None
    applying: float | None = None

    def __call__(self, state: SyncProgress) -> None:
        now = time.perf_counter()
        if state.phase == "receiving" and self.first_page is None:
            self.first_page = now
        elif state.phase == "applying" and self.applying is None:
            self.applying = now


async def tillsync_reinit(agent: Agent) -> dict[str, Any]:
    clock = ProgressClock()
    report = await agent.reinit_catalog("replace", with_customers=True, progress=clock)
    done = time.perf_counter()
    first = clock.first_page or done
    applying = clock.applying or done
    return {
        "total_s": round(done - clock.started, 3),
        "request_to_first_page_s": round(first - clock.started, 3),
        "pages_s": round(applying - first, 3),
        "apply_s": round(done - applying, 3),
        "result": report.result,
        "pages": report.pages,
        "received": report.received,
        "applied": report.applied,
        "errors": report.errors,
    }


async def raw_reinit(
    box: Sandbox, scopes: Sequence[str], page_size: int, work: Path
) -> dict[str, Any]:
    """asyncpg reads the live rows → pages of ``page_size`` (msgpack) published with
    confirms to a queue → a consumer ``executemany``\\ s each page into a plain SQLite table
    (one transaction, committed after the last page)."""
    path = work / "raw-reinit.sqlite3"
    path.unlink(missing_ok=True)
    db = open_sqlite(path, RAW_CATALOG_TABLE)
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    conn = await asyncpg.connect(box.database_url)
    publisher = await aio_pika.connect(box.amqp_url, timeout=15)
    consumer = await aio_pika.connect(box.amqp_url, timeout=15)
    try:
        channel = await publisher.channel(publisher_confirms=True)
        await channel.declare_queue(
            RAW_REINIT_QUEUE, durable=True, arguments=topology.register_queue_arguments()
        )
        consume_channel = await consumer.channel()
        await consume_channel.set_qos(prefetch_count=200)
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        await (await consume_channel.get_queue(RAW_REINIT_QUEUE)).consume(inbox.put)

        def write_page(rows: list[list[Any]], first: bool) -> None:
            if first:
                db.execute("BEGIN")
            db.executemany(RAW_CATALOG_INSERT, rows)

        async def consume() -> tuple[int, float]:
            stored = 0
            while True:
                message = await inbox.get()
                if message.type == "end":
                    await loop.run_in_executor(executor, db.execute, "COMMIT")
                    await message.ack()
                    return stored, time.perf_counter()
                rows = msgpack.unpackb(message.body)
                await loop.run_in_executor(executor, write_page, rows, stored == 0)
                stored += len(rows)
                await message.ack()

        consuming = asyncio.create_task(consume())
        started = time.perf_counter()
        pages = sent = 0
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            for scope in scopes:
                page: list[list[Any]] = []
                query = (
                    "SELECT entity, key, scope, version, scope_seq, state::text "
                    "FROM catalog_entities WHERE scope = $1 AND NOT deleted ORDER BY scope_seq"
                )
                async for row in conn.cursor(query, scope, prefetch=page_size):
                    page.append(list(row))
                    if len(page) >= page_size:
                        await _publish_page(channel, page)
                        pages, sent, page = pages + 1, sent + len(page), []
                if page:
                    await _publish_page(channel, page)
                    pages, sent = pages + 1, sent + len(page)
        end = aio_pika.Message(b"", type="end", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await channel.default_exchange.publish(end, RAW_REINIT_QUEUE, timeout=30)
        published = time.perf_counter()
        stored, committed = await asyncio.wait_for(consuming, timeout=120)
        return {
            "total_s": round(committed - started, 3),
            "read_and_publish_s": round(published - started, 3),
            "pages": pages,
            "rows": stored,
            "rows_sent": sent,
        }
    finally:
        await consumer.close()
        await publisher.close()
        await conn.close()
        executor.shutdown(wait=True)
        db.close()


async def _publish_page(channel: aio_pika.abc.AbstractChannel, page: list[list[Any]]) -> None:
    body = msgpack.packb(page, use_bin_type=True)
    message = aio_pika.Message(body, type="page", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
    await channel.default_exchange.publish(message, RAW_REINIT_QUEUE, timeout=30)


def sqlite_only(path: Path, work: Path) -> dict[str, Any]:
    """The rows the raw pipeline stored, loaded again from memory into a new file: what
    plain sqlite3 alone takes (the issue's "about 0.2 s")."""
    with contextlib.closing(sqlite3.connect(path)) as source:
        rows = source.execute("SELECT * FROM catalog").fetchall()
    target = work / "sqlite-only.sqlite3"
    target.unlink(missing_ok=True)
    db = open_sqlite(target, RAW_CATALOG_TABLE)
    try:
        started = time.perf_counter()
        db.execute("BEGIN")
        db.executemany(RAW_CATALOG_INSERT, rows)
        db.execute("COMMIT")
        return {"rows": len(rows), "seconds": round(time.perf_counter() - started, 3)}
    finally:
        db.close()


async def catalog_counts(pool: asyncpg.Pool, scopes: Sequence[str]) -> dict[str, int]:
    rows = await pool.fetch(
        "SELECT scope, entity, count(*) AS n FROM catalog_entities "
        "WHERE scope = ANY($1::text[]) AND NOT deleted GROUP BY scope, entity",
        list(scopes),
    )
    return {f"{r['scope']}/{r['entity']}": int(r["n"]) for r in rows}


def replica_counts(path: Path) -> dict[str, int]:
    with contextlib.closing(open_readonly(path)) as db:
        rows = db.execute("SELECT scope, entity, count(*) FROM catalog GROUP BY scope, entity")
        return {f"{scope}/{entity}": int(n) for scope, entity, n in rows.fetchall()}


async def reinit_phase(ctx: Context, options: Options, fleet: Fleet) -> dict[str, Any]:
    editor = CatalogEditor(ctx.pool, changed_by="bench")
    # The rows live in a center's scope, so that the fan-out registers never see them.
    await editor.upsert(GLOBAL_SCOPE, "centers", REINIT_CENTER, {"name": "R", "currency": "CZK"})
    progress(f"reinit: loading {options.items} items + {options.customers} customers")
    started = time.perf_counter()
    load = await load_catalog(ctx.pool, REINIT_CENTER, options.items, options.customers)
    await wait_relayed(ctx.pool, REINIT_CENTER)
    load["relayed_after_s"] = round(time.perf_counter() - started, 2)
    progress(f"reinit: loaded in {load['total_s']} s; a new register loads it (start-up delta)")
    register_id = f"b{ctx.box.name.rsplit('_', 1)[-1][:6]}-reinit"
    ctx.users.append(topology.register_username(register_id))
    enrollment = (
        await provision(ctx.pool, ctx.management, ctx.box, REINIT_CENTER, [register_id], 1)
    )[0]
    started = time.perf_counter()
    (agent,) = await fleet.add([enrollment], delta_page_size=options.page_size)
    first_sync = {
        "seconds": round(time.perf_counter() - started, 3),
        "result": agent.history.last.result if agent.history.last else None,
        "received": agent.history.last.received if agent.history.last else None,
    }
    scopes = [GLOBAL_SCOPE, REINIT_CENTER]
    central_counts = await catalog_counts(ctx.pool, scopes)
    disturbances = await ctx.disturbances(fleet)
    runs, raws = [], []
    for run in range(options.reinit_runs):
        progress(f"reinit: run {run + 1} of {options.reinit_runs}: tillsync replace")
        ctx.gc_pauses.settle(options.gc_freeze)
        ctx.gc_pauses.take()
        cpu_before = ctx.cpu()
        result = await tillsync_reinit(agent)
        result["cores_used"] = cores_used(cpu_before, ctx.cpu())
        result["gc_pauses"] = ctx.gc_pauses.take()
        result["counts_equal_central"] = replica_counts(agent.settings.database_path) == (
            central_counts
        )
        runs.append(result)
        progress(f"reinit: {result['total_s']} s; raw pipeline")
        ctx.gc_pauses.settle(options.gc_freeze)
        ctx.gc_pauses.take()
        cpu_before = ctx.cpu()
        raw = await raw_reinit(ctx.box, scopes, options.page_size, ctx.work)
        raw["cores_used"] = cores_used(cpu_before, ctx.cpu())
        raw["gc_pauses"] = ctx.gc_pauses.take()
        raws.append(raw)
        progress(f"reinit: raw {raw['total_s']} s")
    sqlite_alone = sqlite_only(ctx.work / "raw-reinit.sqlite3", ctx.work)
    replica = replica_counts(agent.settings.database_path)
    ours = sorted(r["total_s"] for r in runs)
    theirs = sorted(r["total_s"] for r in raws)
    return {
        "disturbed": await ctx.disturbances(fleet) != disturbances,
        "central_load": load,
        "first_sync_of_new_register": first_sync,
        "tillsync": runs,
        "raw": raws,
        "sqlite_only": sqlite_alone,
        "tillsync_median_s": percentile(ours, 50),
        "raw_median_s": percentile(theirs, 50),
        "ratio": _ratio(percentile(ours, 50), percentile(theirs, 50)),
        "invariant": {
            "central": central_counts,
            "replica": replica,
            "raw_rows": raws[-1]["rows"] if raws else None,
            "ok": replica == central_counts
            and all(r["counts_equal_central"] and r["result"] == "successful" for r in runs)
            and all(r["rows"] == sum(central_counts.values()) for r in raws),
        },
    }


# -- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    sizes: list[int]
    changes: int
    items: int
    customers: int
    reinit_runs: int
    page_size: int
    rpc_workers: int
    provision_concurrency: int
    phases: list[str]
    gc_freeze: bool
    sqlite_gate: int
    fleet_processes: int
    profile_dir: Path | None
    central_log: Path | None
    json_only: bool


async def run_phases(
    options: Options, services: Services, box: Sandbox, work: Path
) -> dict[str, Any]:
    central = CentralProcess(
        services,
        box,
        workers=1,
        log_path=options.central_log or work / "central.log",
        profile_path=None
        if options.profile_dir is None
        else options.profile_dir / "central.pstats",
        rpc_workers=options.rpc_workers,
    )
    pool = await asyncpg.create_pool(box.database_url, min_size=1, max_size=4, init=init_connection)
    users: list[str] = []
    results: dict[str, Any] = {}
    reconnects = 0
    gc_pauses = GcPauses()
    gc.callbacks.append(gc_pauses)
    try:
        progress(f"central: tillsync-central run --rpc-workers {options.rpc_workers}")
        await central.start()
        async with Management(services.api_url, box.name) as management:
            ctx = Context(services, box, pool, management, central, work, users, gc_pauses)
            if "fanout" in options.phases:
                fanout_fleet: AnyFleet = (
                    Fleet(work / "fanout", options.sqlite_gate)
                    if options.fleet_processes == 1
                    else ProcessFleet(
                        work / "fanout",
                        options.sqlite_gate,
                        options.fleet_processes,
                        options.gc_freeze,
                    )
                )
                try:
                    await fanout_fleet.start()
                    results["fanout"] = await fanout_phase(ctx, options, fanout_fleet)
                    results["fanout_probe_sources"] = dict(fanout_fleet.probe.sources)
                finally:
                    with contextlib.suppress(Exception):
                        reconnects += await fanout_fleet.reconnects()
                    progress(f"stopping {fanout_fleet.size} agents")
                    await fanout_fleet.stop()
            if "reinit" in options.phases:
                fleet = Fleet(work / "reinit", options.sqlite_gate)
                try:
                    results["reinit"] = await reinit_phase(ctx, options, fleet)
                finally:
                    reconnects += await fleet.reconnects()
                    await fleet.stop()
        results["central_exit_code"] = await central.stop()
        # Another process restarting the broker or the database spoils the figures.
        results["disturbances"] = {
            "agent_reconnects": reconnects,
            "central_sessions_ended": central.count_in_log("consumer session ended")
            + central.count_in_log("relay session ended"),
            "central_db_retries": central.count_in_log(CENTRAL_DISTURBANCES[2]),
        }
        return results
    finally:
        gc.callbacks.remove(gc_pauses)
        await central.stop()
        try:
            await asyncio.wait_for(pool.close(), timeout=10)
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pool.terminate()
        progress(f"deleting {len(users)} broker users")
        with contextlib.suppress(Exception):
            await delete_users(services, users)


async def run(options: Options, services: Services) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tillsync-bench-") as tmp:
        async with sandbox(services) as box:
            info = await machine(services, box)
            results = await _profiled(options, run_phases(options, services, box, Path(tmp)))
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    # The peak memory of this process: every agent and raw consumer (Linux counts in KiB).
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info["bench_process_max_rss_mb"] = round(peak_kib / 1024)
    return report(options, info, results)


async def _profiled(options: Options, work: Any) -> dict[str, Any]:
    """Await ``work`` under cProfile when ``--profile DIR`` is given (this process)."""
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


def _fanout_targets(fanout: Sequence[dict[str, Any]]) -> dict[str, Any]:
    per_n = {}
    for result in fanout:
        ours, theirs = result["tillsync"], result["raw"]
        p99, raw_p99 = ours["slowest_register"]["p99_ms"], theirs["slowest_register"]["p99_ms"]
        each, raw_each = ours["each_register"]["p99_ms"], theirs["each_register"]["p99_ms"]
        per_n[str(result["registers"])] = {
            "met": p99 is not None and raw_p99 is not None and p99 <= 2 * raw_p99,
            "slowest_register_p99_ms": p99,
            "raw_slowest_register_p99_ms": raw_p99,
            "ratio": _ratio(p99, raw_p99),
            "each_register_met": each is not None and raw_each is not None and each <= 2 * raw_each,
            "each_register_p99_ms": each,
            "raw_each_register_p99_ms": raw_each,
        }
    at_1000 = next((r for r in fanout if r["registers"] == 1000), None)
    under_1s: dict[str, Any] = {"met": None, "note": "1,000 registers not measured in this run"}
    if at_1000 is not None:
        p99 = at_1000["tillsync"]["slowest_register"]["p99_ms"]
        under_1s = {"met": p99 is not None and p99 < 1000, "slowest_register_p99_ms": p99}
    return {"fanout_p99_at_most_2x_raw": per_n, "fanout_p99_under_1s_at_1000_registers": under_1s}


def _reinit_targets(reinit: dict[str, Any]) -> dict[str, Any]:
    ours, theirs, ratio = reinit["tillsync_median_s"], reinit["raw_median_s"], reinit["ratio"]
    slowest = max(r["total_s"] for r in reinit["tillsync"])
    return {
        "reinit_at_most_2x_raw": {
            "met": ratio is not None and ratio <= 2,
            "ratio": ratio,
            "tillsync_median_s": ours,
            "raw_median_s": theirs,
        },
        "reinit_under_10s": {"met": slowest < 10, "slowest_s": slowest, "median_s": ours},
    }


def report(options: Options, info: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    fanout, reinit = results.get("fanout", []), results.get("reinit")
    invariants = [r["invariant"]["ok"] for r in fanout]
    if reinit is not None:
        invariants.append(reinit["invariant"]["ok"])
    # Each phase says whether it was disturbed; the totals also count what happened after
    # the last phase (a restart while the run cleans up spoils nothing).
    disturbed = [r["disturbed"] for r in fanout] + ([reinit["disturbed"]] if reinit else [])
    targets = _fanout_targets(fanout) if fanout else {}
    if reinit is not None:
        targets |= _reinit_targets(reinit)
    return {
        "valid": not any(disturbed) and all(invariants),
        "invariants_ok": all(invariants),
        "disturbances": results["disturbances"],
        "targets": targets,
        "fanout": fanout,
        "fanout_probe_sources": results.get("fanout_probe_sources"),
        "reinit": reinit,
        "central_exit_code": results.get("central_exit_code"),
        "config": {
            "registers": options.sizes,
            "changes_per_size": options.changes,
            "items": options.items,
            "customers": options.customers,
            "reinit_runs": options.reinit_runs,
            "page_size": options.page_size,
            "central": f"tillsync-central run --workers 1 --rpc-workers {options.rpc_workers}",
            "agent_settings": "defaults (synchronous=FULL, prefetch 200)",
            "raw_sqlite_threads": _raw_threads(options),
            "gc_freeze_before_each_measurement": options.gc_freeze,
            "agents_sqlite_gate": options.sqlite_gate or None,
            "fleet_processes": options.fleet_processes,
            "switch_interval_s": sys.getswitchinterval(),
        },
        "machine": info,
    }


def _sizes(text: str) -> list[int]:
    try:
        sizes = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list like 10,100,1000") from None
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("register counts are at least 1")
    return sizes


def parse(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--registers", type=_sizes, default=[10, 100, 500], dest="sizes", help="e.g. 10,100,1000"
    )
    parser.add_argument("--changes", type=int, default=20, help="measured changes per size")
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--reinit-runs", type=int, default=3, help="reinit + raw pipeline runs")
    parser.add_argument("--page-size", type=int, default=1000, help="changes per delta page")
    parser.add_argument("--rpc-workers", type=int, default=1, help="central's catalog RPC workers")
    parser.add_argument(
        "--provision-concurrency", type=int, default=16, help="registers provisioned at once"
    )
    parser.add_argument(
        "--phases",
        type=lambda text: [p for p in text.split(",") if p],
        default=["fanout", "reinit"],
        help="fanout,reinit (both by default)",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, dest="profile_dir", help="write cProfile stats here"
    )
    parser.add_argument(
        "--no-gc-freeze",
        action="store_false",
        dest="gc_freeze",
        help="let every full collection walk every agent (see GcPauses.settle)",
    )
    parser.add_argument(
        "--sqlite-gate",
        type=int,
        default=SQLITE_THREADS,
        help="SQLite calls the in-process agents, and the raw consumers, run at once "
        f"(default {SQLITE_THREADS}; 0: the agents unbounded)",
    )
    parser.add_argument(
        "--fleet-processes",
        type=int,
        default=1,
        help="processes the fan-out's agents (and the raw consumers) are spread over "
        "(default 1: all in this one)",
    )
    parser.add_argument(
        "--central-log", type=Path, default=None, help="keep central's JSON log in this file"
    )
    parser.add_argument("--json-only", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if set(args.phases) - {"fanout", "reinit"} or not args.phases:
        parser.error("--phases takes fanout, reinit or both")
    if args.changes < 1 or args.reinit_runs < 1 or args.items < 1 or args.customers < 0:
        parser.error("need --changes, --reinit-runs and --items >= 1")
    if args.fleet_processes < 1:
        parser.error("--fleet-processes is 1 or more")
    if args.sqlite_gate < 0:
        parser.error("--sqlite-gate is 0 (none) or a number of places")
    return Options(**vars(args))


def main(argv: Sequence[str] | None = None) -> int:
    options = parse(argv)
    configure_logging("console", "warning")  # the agents' logs: stderr, warnings only
    if options.profile_dir is not None:
        options.profile_dir.mkdir(parents=True, exist_ok=True)
    progress.enabled = not options.json_only
    # As `tillsync-agent run` sets its process (tune_gc, shorten_switch_interval); both
    # sides share this one. With the default 5 ms interval, the agents' SQLite threads
    # waited on a busy loop for the GIL, and a change's slowest register with them.
    shorten_switch_interval()
    if options.gc_freeze:
        gc.set_threshold(*GC_THRESHOLDS)
    return run_and_print(run(options, services_from_env()))


if __name__ == "__main__":
    sys.exit(main())
