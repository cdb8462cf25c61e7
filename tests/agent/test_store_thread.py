"""The store's SQLite thread does not preempt the event loop when it is handed work: it
runs ``SCHED_BATCH`` on Linux, and the loop's own thread keeps its policy."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from pathlib import Path

import pytest
import structlog.testing

from tillsync_agent.store import Store

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="scheduling policies per thread are Linux's"
)


def _policy(_: sqlite3.Connection) -> tuple[int, int]:
    return threading.get_native_id(), os.sched_getscheduler(0)


async def test_the_sqlite_thread_is_sched_batch_and_the_loop_is_not(tmp_path: Path) -> None:
    loop_policy = os.sched_getscheduler(0)
    async with Store(tmp_path / "agent.db") as store:
        thread_id, policy = await store.in_thread(_policy)
        assert thread_id != threading.get_native_id()
        assert policy == os.SCHED_BATCH
        # Per thread: the rest of the process is as it was.
        assert os.sched_getscheduler(0) == loop_policy != os.SCHED_BATCH
        # Through the store's write path too: it is the same one thread.
        assert await store.write_in_thread(_policy) == (thread_id, os.SCHED_BATCH)


async def test_a_refused_policy_is_said_once_and_the_store_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As under a seccomp filter that denies ``sched_setscheduler`` (EPERM)."""

    def refused(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refused)
    with structlog.testing.capture_logs() as logs:
        async with Store(tmp_path / "agent.db") as store:
            _, policy = await store.in_thread(_policy)
            await store.write_in_thread(lambda db: db.execute("CREATE TABLE t (x)"))
    assert policy != os.SCHED_BATCH
    said = [e for e in logs if e["event"] == "SQLite thread keeps the default scheduling policy"]
    assert len(said) == 1
    assert said[0]["log_level"] == "info"
    assert "Operation not permitted" in said[0]["error"]
