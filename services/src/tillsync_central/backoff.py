"""Capped exponential backoff with jitter: the one retry policy of central's loops."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["Backoff"]


@dataclass
class Backoff:
    """``next()`` grows as ``base * 2**n`` up to ``cap``, half of it random ("equal
    jitter"), so workers that failed together do not retry together; never 0."""

    base: float
    cap: float
    attempts: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next(self) -> float:
        """The delay before the next try, counting this failure."""
        ceiling = min(self.cap, self.base * float(2 ** min(self.attempts, 32)))
        self.attempts += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def reset(self) -> None:
        self.attempts = 0
