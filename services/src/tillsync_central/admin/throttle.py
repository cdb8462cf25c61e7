"""Slowing down password guessing: failed logins counted per username.

The first ``free`` failures of a username cost nothing more than the scrypt check; after
that, each attempt must wait ``base_s × 2^(extra failures)`` seconds (at most ``cap_s``)
after the last failure, or is refused with ``too_many_attempts`` (429) without checking
the password. A successful login forgets the name. Keyed by username, not by address:
behind a proxy every operator has the same address, and the lockout of one name is
bounded by ``cap_s``. In memory, per process (a restart forgets; several API processes
each count on their own).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from .errors import AdminError

__all__ = ["LoginThrottle"]


@dataclass
class _Failures:
    count: int
    last: float


class LoginThrottle:
    def __init__(
        self,
        *,
        free: int = 5,
        base_s: float = 1.0,
        cap_s: float = 300.0,
        max_names: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._free = free
        self._base_s = base_s
        self._cap_s = cap_s
        self._max_names = max_names
        self._clock = clock
        self._failures: OrderedDict[str, _Failures] = OrderedDict()

    def wait_s(self, username: str) -> float:
        """Seconds before ``username`` may try again (0: now)."""
        failures = self._failures.get(username.lower())
        if failures is None or failures.count < self._free:
            return 0.0
        delay = min(self._cap_s, self._base_s * 2.0 ** (failures.count - self._free))
        return max(0.0, failures.last + delay - self._clock())

    def check(self, username: str) -> None:
        wait = self.wait_s(username)
        if wait > 0:
            raise AdminError(
                f"too many failed logins for this username; try again in {wait:.0f} s",
                field="username",
                code="too_many_attempts",
            )

    def failed(self, username: str) -> None:
        key = username.lower()
        failures = self._failures.pop(key, None) or _Failures(0, 0.0)
        failures.count += 1
        failures.last = self._clock()
        self._failures[key] = failures  # most recent last
        while len(self._failures) > self._max_names:
            self._failures.popitem(last=False)

    def succeeded(self, username: str) -> None:
        self._failures.pop(username.lower(), None)
