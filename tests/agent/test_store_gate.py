"""A gate shared by the stores of agents hosted in one process: at most that many of their
one-hop SQLite calls run at once, every call still commits, and nothing deadlocks."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

from tillsync_agent.outbox import Outbox
from tillsync_agent.replica import Replica
from tillsync_agent.store import Store
from tillsync_protocol import GLOBAL_SCOPE
from tillsync_protocol.control import CatalogChangeBody

from .documents import receipt


class Overlap:
    """How many calls were on their threads at once, at most."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._now = 0
        self.most = 0

    def work(self, db: sqlite3.Connection, key: str) -> None:
        with self._lock:
            self._now += 1
            self.most = max(self.most, self._now)
        time.sleep(0.1)  # long enough for the other calls to have started, ungated
        db.execute("CREATE TABLE IF NOT EXISTS marks (key TEXT PRIMARY KEY)")
        db.execute("INSERT INTO marks VALUES (?)", (key,))
        with self._lock:
            self._now -= 1


async def _run_six(tmp_path: Path, gate: asyncio.Semaphore | None) -> int:
    overlap = Overlap()
    stores = [Store(tmp_path / f"{i}.db", gate=gate) for i in range(6)]
    for store in stores:
        await store.open()
    try:
        await asyncio.gather(
            *(
                store.write_in_thread(lambda db, i=i: overlap.work(db, f"k{i}"))
                for i, store in enumerate(stores)
            )
        )
    finally:
        for store in stores:
            await store.close()
    for i in range(6):  # every call committed its row, gated or not
        with sqlite3.connect(tmp_path / f"{i}.db") as db:
            assert db.execute("SELECT key FROM marks").fetchall() == [(f"k{i}",)]
    return overlap.most


async def test_a_shared_gate_bounds_the_calls_on_their_threads(tmp_path: Path) -> None:
    (tmp_path / "gated").mkdir()
    (tmp_path / "free").mkdir()
    assert await _run_six(tmp_path / "gated", asyncio.Semaphore(2)) == 2
    # The control: without a gate more run at once (all six, unless the machine is slow).
    assert await _run_six(tmp_path / "free", None) > 2


def _change(seq: int) -> CatalogChangeBody:
    state = {"name": f"Item {seq}", "gross_price": 100 + seq, "barcodes": [f"859{seq:010d}"]}
    return CatalogChangeBody(
        scope=GLOBAL_SCOPE,
        scope_seq=seq,
        entity="items",
        key=f"i{seq}",
        op="upsert",
        version=seq,
        state=state,
    )


async def test_outboxes_and_replicas_behind_a_gate_of_one_all_commit(tmp_path: Path) -> None:
    """Submits (write lock, then gate) and catalog changes of 20 agents interleaved through
    one place: all of them commit, in order, within the timeout."""
    gate = asyncio.Semaphore(1)
    stores = [Store(tmp_path / f"{i}" / "agent.db", gate=gate) for i in range(20)]
    for store in stores:
        await store.open()
    try:
        outboxes = [Outbox(s, register_id=f"r-{i}", center_id="c-1") for i, s in enumerate(stores)]
        for outbox in outboxes:
            await outbox.load()
        replicas = [Replica(s, path=s.path, center_id="c-1") for s in stores]

        async def agent(outbox: Outbox, replica: Replica) -> None:
            for seq in range(1, 6):
                submitted, statuses = await asyncio.gather(
                    outbox.submit("receipt", receipt()), replica.apply_changes([_change(seq)])
                )
                assert submitted.seq == seq
                assert statuses == ["applied"]

        await asyncio.wait_for(
            asyncio.gather(*(agent(o, r) for o, r in zip(outboxes, replicas, strict=True))), 60
        )
        assert all(o.counts.pending == 5 for o in outboxes)
        for replica in replicas:
            await replica.close()
    finally:
        for store in stores:
            await store.close()
    for store in stores:  # both ends: the files hold what the counters say
        with sqlite3.connect(store.path) as db:
            assert db.execute("SELECT COUNT(*) FROM outbox").fetchone() == (5,)
            assert db.execute("SELECT seq FROM catalog_cursors").fetchall() == [(5,)]
            assert db.execute("SELECT COUNT(*) FROM item_barcodes").fetchone() == (5,)
