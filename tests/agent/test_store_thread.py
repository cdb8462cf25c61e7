"""The store's SQLite thread does not preempt the event loop when it is handed work: it
runs ``SCHED_BATCH`` on Linux, and the loop's own thread keeps its policy."""

from __future__ import annotations

import os
import sqlite3
import sys
import threading
from pathlib import Path

import pytest

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
