"""The retry schedule of the protocol: exponential backoff with jitter and a cap.

Registers use it for resends and reconnects, central for its reconnects and database
retries; ``docs/protocol.md`` ("Retries") describes it for implementers in other languages.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """``delay(n)`` grows as ``base * 2**n`` up to ``cap``, half of it random ("equal
    jitter"), so peers that failed together do not retry together; never 0 (no busy loop)."""

    base: float
    cap: float
    attempts: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def delay(self, attempt: int | None = None) -> float:
        n = self.attempts if attempt is None else attempt
        ceiling = min(self.cap, self.base * float(2 ** min(n, 32)))
        return float(ceiling / 2 + self._rng.uniform(0, ceiling / 2))

    def next(self) -> float:
        """The delay before the next try, counting this failure."""
        value = self.delay()
        self.attempts += 1
        return value

    def reset(self) -> None:
        self.attempts = 0
