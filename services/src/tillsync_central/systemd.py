"""systemd's notify protocol (``Type=notify``, ``WatchdogSec=``) without libsystemd.

systemd passes a Unix datagram socket in ``$NOTIFY_SOCKET`` and, with a watchdog, its
period in ``$WATCHDOG_USEC``. The service sends ``READY=1`` once it serves,
``WATCHDOG=1`` more often than the period, and ``STOPPING=1`` when it begins to stop.
Outside systemd (no ``$NOTIFY_SOCKET``) every call is a no-op. A datagram that cannot be
sent is logged and dropped: notification never stops the service.

The pings come from a task on the event loop and only while ``healthy()`` says every
loop of the service still runs: a blocked event loop or a dead loop stops them, and
systemd restarts the service after ``WatchdogSec``. (The agent has the same small client
in ``tillsync_agent.systemd``: neither package may import the other, and the protocol
package does no I/O; ``tests/central/test_systemd.py`` keeps the two files equal but for
this sentence.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import structlog

__all__ = ["Notifier", "run_supervised"]

log = structlog.get_logger(__name__)

T = TypeVar("T")


class Notifier:
    """Sends notifications to systemd's ``NOTIFY_SOCKET`` (a no-op without one)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _socket_address(address) if address else None
        self.watchdog_interval: float | None = (
            watchdog_usec / 2 / 1_000_000 if watchdog_usec and self._address else None
        )
        """Seconds between ``WATCHDOG=1`` pings (half the period), or None: no watchdog."""
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], pid: int) -> Notifier:
        """From ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` (the watchdog is
        ours only if ``WATCHDOG_PID`` is unset or our ``pid``)."""
        usec: int | None = None
        with contextlib.suppress(ValueError):
            usec = int(environ.get("WATCHDOG_USEC", "")) or None
        owner = environ.get("WATCHDOG_PID")
        if owner and owner != str(pid):
            usec = None
        return cls(environ.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, state: str) -> bool:
        """Send one state (``READY=1``, ``STATUS=…``…); True if it was sent."""
        if self._address is None:
            return False
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(state.encode(), self._address)
        except OSError as exc:
            if not self._failed:  # once: a missing socket would otherwise log every ping
                log.warning("systemd notification not sent", state=state, error=str(exc))
            self._failed = True
            return False
        return True

    def ready(self) -> bool:
        return self.notify("READY=1")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _socket_address(address: str) -> str | bytes:
    # "@name" is Linux's abstract namespace: a leading NUL byte instead of a path.
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    return address


async def _notify_while_running(
    notifier: Notifier, started: asyncio.Event, healthy: Callable[[], bool]
) -> None:
    await started.wait()
    notifier.ready()
    log.info("ready", systemd=notifier.enabled, watchdog_interval_s=notifier.watchdog_interval)
    interval = notifier.watchdog_interval
    if interval is None:
        return
    while True:
        if healthy():
            notifier.watchdog()
        else:
            log.error("unhealthy: watchdog pings withheld, systemd will restart the service")
        await asyncio.sleep(interval)


async def run_supervised(
    main: Awaitable[T],
    notifier: Notifier,
    *,
    started: asyncio.Event,
    healthy: Callable[[], bool],
) -> T:
    """Await ``main`` while telling systemd: ``READY=1`` once ``started`` is set, then
    ``WATCHDOG=1`` every half period while ``healthy()``; ``STOPPING=1`` when it ends."""
    notifying = asyncio.ensure_future(_notify_while_running(notifier, started, healthy))
    try:
        return await main
    finally:
        notifying.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await notifying
        notifier.stopping()
        notifier.close()
