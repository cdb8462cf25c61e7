"""What a long-running service does to its own Python process: the garbage collector.

CPython's default thresholds (700, 10, 10) make a busy service collect its oldest
generation every few seconds, and such a collection scans every tracked object: with a
message flow it stopped the agent's (and central's) event loop for 50–220 ms at a time
in ``bench/upward.py`` (measured with ``gc.callbacks``), which is where submit→ack tails
came from. Objects made by the imports and the set-up are frozen (never scanned again),
and young collections are rarer, so fewer objects live long enough to be promoted. Only
reference cycles wait longer to be freed; everything else is freed by reference counting
as before. (Central has the same function in ``tillsync_central.process``: neither
package may import the other.)
"""

from __future__ import annotations

import gc

__all__ = ["GC_THRESHOLDS", "tune_gc"]

GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Freeze what exists now and raise the collection thresholds (call once, at start)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
