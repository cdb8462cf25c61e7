"""Many replicas in one process: what their SQLite threads cost, with and without a gate.

    uv run python bench/replica_threads.py [--replicas 1000] [--rounds 7] [--gate 32]

No broker and no central: ``--replicas`` agent stores (each a real ``Store`` and
``Replica`` with its own SQLite file, WAL, ``synchronous=FULL``), and in each round one
``catalog_change`` applied by all of them at once (``asyncio.gather``). Measured, each in
its own fresh set of files, in this order:

- **raw**: plain ``sqlite3``, one file per replica, ``BEGIN``/``INSERT``/``COMMIT`` of the
  same bytes per file on a pool of ``--gate`` threads (as ``bench/downward.py``'s raw
  consumers do);
- **ungated**: ``Replica.apply_changes`` on every store, each on its own aiosqlite thread;
- **gated**: the same with one ``asyncio.Semaphore(--gate)`` shared by the stores (the
  agent's ``sqlite_gate``).

Per variant: the wall time of a round (all replicas applied) and this process's CPU per
replica, medians over the rounds. It prints one JSON object; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import median
from typing import Any

from _setup import (
    PROBE_KEY,
    RAW_CHANGES_TABLE,
    cpu_model,
    insert_change,
    open_sqlite,
    probe_state,
    progress,
)
from tillsync_agent.replica import Replica
from tillsync_agent.store import Store
from tillsync_protocol import GLOBAL_SCOPE
from tillsync_protocol.control import CatalogChangeBody


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _change(seq: int) -> CatalogChangeBody:
    return CatalogChangeBody(
        scope=GLOBAL_SCOPE,
        scope_seq=seq,
        entity="items",
        key=PROBE_KEY,
        op="upsert",
        version=seq,
        state=probe_state(100 + seq),
    )


async def _rounds(
    count: int, rounds: int, one_round: Callable[[int], Awaitable[None]]
) -> dict[str, float]:
    walls: list[float] = []
    cpus: list[float] = []
    for r in range(1, rounds + 1):
        cpu, started = _cpu_s(), time.perf_counter()
        await one_round(r)
        walls.append(time.perf_counter() - started)
        cpus.append(_cpu_s() - cpu)
        await asyncio.sleep(0.05)  # the last commits' wake-ups settle
    return {
        "round_ms_p50": round(median(walls) * 1e3, 1),
        "cpu_ms_per_replica_p50": round(median(cpus) * 1e3 / count, 3),
    }


async def raw(work: Path, count: int, rounds: int, threads: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=threads)
    dbs = [open_sqlite(work / f"{i}.sqlite3", RAW_CHANGES_TABLE) for i in range(count)]

    async def one_round(r: int) -> None:
        body = _change(r).model_dump_json().encode()  # the same size, near enough
        await asyncio.gather(
            *(loop.run_in_executor(executor, insert_change, db, f"m{r}", body) for db in dbs)
        )

    try:
        return await _rounds(count, rounds, one_round)
    finally:
        executor.shutdown(wait=True)
        for db in dbs:
            db.close()


async def tillsync(
    work: Path, count: int, rounds: int, gate: asyncio.Semaphore | None
) -> dict[str, float]:
    stores = [Store(work / f"{i}" / "agent.db", gate=gate) for i in range(count)]
    replicas: list[Replica] = []
    try:
        for store in stores:
            await store.open()
            replicas.append(Replica(store, path=store.path, center_id="bench"))

        async def one_round(r: int) -> None:
            change = _change(r)
            statuses = await asyncio.gather(*(rep.apply_changes([change]) for rep in replicas))
            if any(s != ["applied"] for s in statuses):
                raise RuntimeError(f"round {r}: not every replica applied its change")

        return await _rounds(count, rounds, one_round)
    finally:
        for replica in replicas:
            await replica.close()
        for store in stores:
            await store.close()


async def run(count: int, rounds: int, gate: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tillsync-bench-", dir="/var/tmp") as tmp:
        for name in ("raw", "ungated", "gated"):
            work = Path(tmp) / name
            work.mkdir()
            progress(f"{name}: {count} replicas, {rounds} rounds")
            if name == "raw":
                results[name] = await raw(work, count, rounds, gate)
            else:
                shared = asyncio.Semaphore(gate) if name == "gated" else None
                results[name] = await tillsync(work, count, rounds, shared)
    base = results["raw"]
    return {
        "benchmark": "replica_threads",
        "machine": {
            "cores": os.cpu_count(),
            "cpu": cpu_model(),
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "config": {"replicas": count, "rounds": rounds, "gate": gate, "raw_threads": gate},
        **results,
        "ratio_to_raw": {
            name: {
                key: round(results[name][key] / base[key], 2) if base[key] else None for key in base
            }
            for name in ("ungated", "gated")
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--replicas", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--gate", type=int, default=32, help="gate places, and raw threads")
    parser.add_argument("--json-only", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.replicas < 1 or args.rounds < 1 or args.gate < 1:
        parser.error("--replicas, --rounds and --gate are at least 1")
    progress.enabled = not args.json_only
    print(json.dumps(asyncio.run(run(args.replicas, args.rounds, args.gate)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
