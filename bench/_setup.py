"""What the benchmarks share: a sandbox (a fresh vhost and database, dropped at the end),
the real ``tillsync-central run`` as a subprocess, progress lines, percentiles and where
the CPU went.

Not a benchmark itself: ``bench/upward.py`` and ``bench/downward.py`` import it (run them as
scripts, ``uv run python bench/<name>.py``, so that this directory is on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import asyncpg
import httpx

from tillsync_protocol import topology

BIN = Path(sys.executable).parent

DEFAULTS = {
    "TILLSYNC_AMQP_URL": "amqp://tillsync:tillsync@127.0.0.1:5672/",
    "TILLSYNC_DATABASE_URL": "postgresql://tillsync:tillsync@127.0.0.1:5432/tillsync",
    "TILLSYNC_RABBITMQ_API_URL": "http://tillsync:tillsync@127.0.0.1:15672/",
}
HTTP_TIMEOUT_S = 30.0


class _Progress:
    """Progress lines on stderr (off with ``--json-only``)."""

    enabled = True

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


progress = _Progress()


# -- figures --------------------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Nearest-rank percentile of already sorted values (None if there are none)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_summary(values_ms: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(round(value, 1) for value in values_ms)
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 50),
        "p90_ms": percentile(ordered, 90),
        "p99_ms": percentile(ordered, 99),
        "max_ms": ordered[-1] if ordered else None,
        "mean_ms": round(sum(ordered) / len(ordered), 1) if ordered else None,
    }


# -- where the CPU went (Linux /proc; zeros elsewhere) -------------------------------------


@dataclass(frozen=True)
class CpuSample:
    at: float
    seconds: dict[str, float]


def _proc_cpu_s(pid: int) -> float:
    with contextlib.suppress(OSError, IndexError, ValueError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


def _processes_named(comm: str) -> list[tuple[int, str]]:
    """``(pid, command line)`` of the processes called ``comm``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == comm:
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                    found.append((int(entry.name), cmdline.decode(errors="replace")))
    return found


def _machine_busy_s() -> float:
    """CPU seconds all cores spent busy (everything but idle and iowait)."""
    with contextlib.suppress(OSError, ValueError):
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(values[:8]) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
    return 0.0


def cpu_sample(central_pid: int | None, database: str, hosts: Sequence[int] = ()) -> CpuSample:
    """CPU seconds so far of this process and ``hosts`` (agents, submitters, baseline
    client, wherever the bench runs them), central,
    RabbitMQ (every beam.smp), PostgreSQL's backends serving ``database``, every other
    postgres process (its WAL writer and checkpointer, and other users' sessions: a
    large figure there means someone else is loading the machine) and the machine."""
    postgres = _processes_named("postgres")
    ours = sum(_proc_cpu_s(pid) for pid, cmdline in postgres if f" {database} " in cmdline)
    return CpuSample(
        time.perf_counter(),
        {
            "bench_process": time.process_time() + sum(_proc_cpu_s(pid) for pid in hosts),
            "central": 0.0 if central_pid is None else _proc_cpu_s(central_pid),
            "rabbitmq": sum(_proc_cpu_s(pid) for pid, _ in _processes_named("beam.smp")),
            "postgres_sandbox": ours,
            "postgres_other": sum(_proc_cpu_s(pid) for pid, _ in postgres) - ours,
            "machine": _machine_busy_s(),
        },
    )


def cores_used(before: CpuSample, after: CpuSample) -> dict[str, float]:
    """Average cores each part kept busy between two samples."""
    wall = after.at - before.at
    return {
        name: round((after.seconds[name] - before.seconds.get(name, 0.0)) / wall, 2)
        for name in after.seconds
    }


# -- child processes of a bench ------------------------------------------------------------


def take_stdout() -> IO[str]:
    """In a bench's child process: a handle on stdout, the bench's channel; from now on
    anything else written to stdout (a library's print) goes to stderr."""
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return out


async def stop_child(process: asyncio.subprocess.Process, grace_s: float) -> None:
    """``{"cmd": "stop"}`` and the end of stdin (either stops a bench's child); SIGTERM
    after ``grace_s``, SIGKILL after as long again, then up to 10 s for it to go."""
    if process.returncode is None and process.stdin is not None:
        with contextlib.suppress(OSError, RuntimeError):
            process.stdin.write(b'{"cmd": "stop"}\n')
            process.stdin.close()
    for escalate in (process.terminate, process.kill):
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), timeout=grace_s)
            return
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                escalate()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), timeout=10)


# -- a sandbox: one vhost and one database for this run -------------------------------------


@dataclass(frozen=True)
class Services:
    amqp_url: str
    database_url: str
    api_url: str

    @property
    def api_base(self) -> str:
        parts = urlsplit(self.api_url)
        netloc = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
        return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))

    @property
    def api_auth(self) -> tuple[str, str]:
        parts = urlsplit(self.api_url)
        return unquote(parts.username or "guest"), unquote(parts.password or "guest")

    def api_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.api_base, auth=self.api_auth, timeout=HTTP_TIMEOUT_S)


@dataclass(frozen=True)
class Sandbox:
    name: str
    amqp_url: str
    database_url: str


def _with_path(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(name, safe="")))


@contextlib.asynccontextmanager
async def sandbox(services: Services) -> AsyncIterator[Sandbox]:
    """A new vhost (the admin user may do anything in it) and a new empty database."""
    name = f"tillsync_bench_{secrets.token_hex(4)}"
    vhost = quote(name, safe="")
    user = quote(services.api_auth[0], safe="")
    try:
        async with services.api_client() as client:
            (await client.put(f"/api/vhosts/{vhost}")).raise_for_status()
            everything = {"configure": ".*", "write": ".*", "read": ".*"}
            response = await client.put(f"/api/permissions/{vhost}/{user}", json=everything)
            response.raise_for_status()
        admin = await asyncpg.connect(services.database_url, timeout=HTTP_TIMEOUT_S)
        try:
            # The name is ours (token_hex): an identifier cannot be a bound parameter.
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        progress(f"sandbox {name}: vhost and database created")
        yield Sandbox(
            name,
            _with_path(services.amqp_url, name),
            _with_path(services.database_url, name),
        )
    finally:
        await _drop_sandbox(services, name)


async def _drop_sandbox(services: Services, name: str) -> None:
    """Drop the database and the vhost, each even if the other fails; say what is left.
    Each is retried for a while: the dev services are shared with the test suite's fault
    tests, which restart them."""
    left = []
    error: BaseException | None = None
    for attempt in range(10):
        try:
            conn = await asyncpg.connect(services.database_url, timeout=HTTP_TIMEOUT_S)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            finally:
                await conn.close()
            break
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            error = exc
        await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
    else:
        left.append(f"database ({error!r})")
    for attempt in range(10):
        try:
            async with services.api_client() as client:
                response = await client.delete(f"/api/vhosts/{quote(name, safe='')}")
            if response.status_code in (204, 404):
                break
        except httpx.HTTPError:
            pass
        await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
    else:
        left.append("vhost (management API unreachable)")
    if left:
        progress(f"sandbox {name}: NOT dropped: {', '.join(left)}")
    else:
        progress(f"sandbox {name}: vhost and database dropped")


async def delete_users(services: Services, users: Sequence[str]) -> None:
    """Broker users are global, not per vhost: the registers' users go explicitly (in
    bulk: one call for all of them)."""
    if not users:
        return
    async with services.api_client() as client:
        await client.post("/api/users/bulk-delete", json={"users": list(users)})


# -- central: the real `tillsync-central run` ------------------------------------------------


@dataclass
class CentralProcess:
    services: Services
    box: Sandbox
    workers: int
    log_path: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    profile_path: Path | None = None
    rpc_workers: int = 1
    process: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        script = str(BIN / "tillsync-central")
        args = ["run", "--workers", str(self.workers), "--rpc-workers", str(self.rpc_workers)]
        if self.profile_path is None:
            return [script, *args]
        return [sys.executable, "-m", "cProfile", "-o", str(self.profile_path), script, *args]

    async def start(self) -> None:
        env = {
            **os.environ,
            "TILLSYNC_AMQP_URL": self.box.amqp_url,
            "TILLSYNC_DATABASE_URL": self.box.database_url,
            "TILLSYNC_RABBITMQ_API_URL": self.services.api_url,
            "TILLSYNC_LOG_FORMAT": "json",
            **self.extra_env,
        }
        with self.log_path.open("ab") as log:
            self.process = await asyncio.to_thread(
                subprocess.Popen, self.command(), env=env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 60
        while (
            await self._consumers(topology.INGEST_QUEUE) < self.workers
            or await self._consumers(topology.RPC_QUEUE) < self.rpc_workers
        ):
            if self.process.poll() is not None:
                raise RuntimeError(f"tillsync-central exited {self.process.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("tillsync-central's workers did not consume within 60 s")
            await asyncio.sleep(0.2)

    async def _consumers(self, queue: str) -> int:
        path = f"/api/queues/{quote(self.box.name, safe='')}/{quote(queue, safe='')}"
        try:
            async with self.services.api_client() as client:
                response = await client.get(path)
        except httpx.HTTPError:  # the broker restarting (a test's fault injection): not yet
            return 0
        return int(response.json().get("consumers", 0)) if response.status_code == 200 else 0

    async def stop(self) -> int | None:
        """SIGTERM (central drains and exits), SIGKILL after 30 s."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait, 10)
        return self.process.returncode

    def count_in_log(self, event: str) -> int:
        text = self.log_path.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if f'"event": "{event}"' in line)


# -- the run's context --------------------------------------------------------------------


async def machine(services: Services, box: Sandbox) -> dict[str, Any]:
    async with services.api_client() as client:
        overview = (await client.get("/api/overview")).json()
    conn = await asyncpg.connect(box.database_url)
    try:
        postgres = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "rabbitmq": overview.get("rabbitmq_version"),
        "erlang": overview.get("erlang_version"),
        "postgres": postgres,
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def services_from_env() -> Services:
    env = {key: os.environ.get(key) or default for key, default in DEFAULTS.items()}
    return Services(
        env["TILLSYNC_AMQP_URL"], env["TILLSYNC_DATABASE_URL"], env["TILLSYNC_RABBITMQ_API_URL"]
    )


async def submit_all(
    submit: Callable[[str, dict[str, Any]], Awaitable[object]],
    docs: Iterable[tuple[str, dict[str, Any]]],
    concurrency: int,
) -> None:
    """Submit ``docs`` in order with up to ``concurrency`` submits waiting (the agent's
    outbox commits every submit queued behind the one being written together)."""
    shared = iter(docs)

    async def submitter() -> None:
        for doc_type, body in shared:
            await submit(doc_type, body)

    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(submitter())


async def cancel_on_sigterm(work: Coroutine[Any, Any, dict[str, Any]]) -> dict[str, Any]:
    """SIGTERM cancels the run as Ctrl-C does, so the sandbox is dropped either way."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await work
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


def run_and_print(work: Coroutine[Any, Any, dict[str, Any]]) -> int:
    """A bench's ``main``: run ``work`` (SIGTERM cancels it as Ctrl-C does), print its JSON
    result on stdout; the exit status."""
    try:
        result = asyncio.run(cancel_on_sigterm(work))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: the sandbox vhost and database were dropped", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    return 0


def documents_table(name: str) -> tuple[str, str]:
    """``CREATE TABLE`` and batch ``INSERT`` (three arrays: register ids, seqs, payloads)
    of a raw consumer's table of documents, keyed as central's ``documents`` is."""
    create = f"""
CREATE TABLE {name} (
    register_id text   NOT NULL,
    seq         bigint NOT NULL,
    payload     bytea  NOT NULL,
    PRIMARY KEY (register_id, seq)
)
"""
    insert = f"""
INSERT INTO {name} (register_id, seq, payload)
SELECT * FROM unnest($1::text[], $2::bigint[], $3::bytea[])
ON CONFLICT DO NOTHING
"""
    return create, insert


# -- shared by the downward benches: the probe item, and SQLite as the agent sets it up ---

PROBE_KEY = "bench-probe"
RAW_CHANGES_TABLE = "CREATE TABLE IF NOT EXISTS changes (msg_id TEXT PRIMARY KEY, body BLOB)"


def probe_state(price: int) -> dict[str, Any]:
    """The state of the item the fan-out benches change (only its price moves)."""
    return {
        "name": "Bench probe",
        "gross_price": price,
        "currency": "CZK",
        "tax_rate_id": "vat-21",
        "barcodes": ["8590000000017"],
        "labels": [],
    }


def open_sqlite(path: Path, table_sql: str) -> sqlite3.Connection:
    """A plain ``sqlite3`` file as the agent sets its own up (WAL, ``synchronous=FULL``),
    for the raw baselines."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(table_sql)
    return db


def insert_change(db: sqlite3.Connection, msg_id: str, body: bytes) -> None:
    """The raw consumer's work for one change: insert and commit."""
    db.execute("BEGIN")
    db.execute("INSERT INTO changes VALUES (?, ?)", (msg_id, body))
    db.execute("COMMIT")
