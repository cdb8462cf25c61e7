"""What a long-running service does to its own Python process: the garbage collector,
and (the agent only) the interpreter's thread switch interval.

CPython's default thresholds (700, 10, 10) make a busy service collect its oldest
generation every few seconds, and such a collection scans every tracked object: with a
message flow it stopped the agent's (and central's) event loop for 50–220 ms at a time
in ``bench/upward.py`` (measured with ``gc.callbacks``), which is where submit→ack tails
came from. Objects made by the imports and the set-up are frozen (never scanned again),
and young collections are rarer, so fewer objects live long enough to be promoted. Only
reference cycles wait longer to be freed; everything else is freed by reference counting
as before. (Central has the same function in ``tillsync_central.process``: neither
package may import the other.)

The agent runs its SQLite work on a thread of its own (aiosqlite), and every statement
releases the GIL and takes it back; while the event loop is busy, taking it back waits
for the loop to hand it over, which CPython forces only every ``sys.getswitchinterval()``
(5 ms by default). A submit or an ack is a transaction of several statements, so under
load its thread could wait several such intervals. :func:`shorten_switch_interval` makes
it 0.5 ms (measured in ``docs/performance.md``, "Fourth session … the GIL"). Central has
no such thread and keeps the default.

Handing that thread a transaction wakes it, and Linux lets a thread that wakes up
preempt the one running on its core, here the event loop, which holds the GIL at that
moment: the woken thread asks for the GIL at once and waits, and the loop waits to be
scheduled again, at every hand-over. :func:`no_wakeup_preemption` makes the SQLite
thread ``SCHED_BATCH`` (``sched(7)``): it still gets its fair share of CPU, but waits for
the running thread's turn to end instead of preempting it, and on an idle core it runs at
once as before. In ``bench/upward.py`` that lowered the submit→ack p99 at 1,200
documents/s from 81–178 ms to 67–85 ms in 6 alternated pairs (``docs/performance.md``,
eleventh session).
"""

from __future__ import annotations

import gc
import os
import sys

import structlog

__all__ = [
    "GC_THRESHOLDS",
    "SWITCH_INTERVAL_S",
    "no_wakeup_preemption",
    "shorten_switch_interval",
    "tune_gc",
]

log = structlog.get_logger(__name__)

GC_THRESHOLDS = (50_000, 20, 100)
SWITCH_INTERVAL_S = 0.0005


def tune_gc() -> None:
    """Freeze what exists now and raise the collection thresholds (call once, at start)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def shorten_switch_interval() -> None:
    """Let the SQLite thread have the GIL back sooner from a busy event loop (call once,
    at start; see the module's docstring)."""
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def no_wakeup_preemption() -> bool:
    """Make the calling thread ``SCHED_BATCH`` (see the module's docstring); False where
    the system has no such policy (not Linux) or refuses it, which changes only timing."""
    if not hasattr(os, "sched_setscheduler") or not hasattr(os, "SCHED_BATCH"):
        return False
    try:
        # pid 0: the calling thread, not the whole process (Linux schedules threads).
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError as exc:
        # Said once per start: a unit or container that forbids it costs latency under load.
        log.info("SQLite thread keeps the default scheduling policy", error=repr(exc))
        return False
    return True
