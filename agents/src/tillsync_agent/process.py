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
"""

from __future__ import annotations

import gc
import sys

__all__ = ["GC_THRESHOLDS", "SWITCH_INTERVAL_S", "shorten_switch_interval", "tune_gc"]

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
