"""A share of ``bench/downward.py``'s fan-out fleet in a process of its own
(``--fleet-processes K``).

    python bench/_fleet_child.py '{"data_dir": …, "sqlite_gate": 32, "gc_freeze": true}'

The process is set up as the bench's own (the agent's thread switch interval, and its GC
thresholds unless ``gc_freeze`` is false) and hosts agents exactly as the bench does
in-process (``downward.Fleet``: the production defaults, one shared ``sqlite_gate``), and
the raw baseline's consumers of the same share of queues (``downward.RawConsumers``).
Commands come one JSON object a line on stdin; each gets one JSON reply line on stdout
(``{"ok": true, …}``, or ``{"ok": false, "error": …}``):

- ``ready`` → once listening;
- ``add`` with ``indices`` and ``enrollments`` (register_id, center_id, broker_user,
  password, amqp_url) → ``database_paths``, once each agent is linked and has finished its
  start-up delta;
- ``reconnects`` → ``reconnects`` (all agents');
- ``settle`` with ``freeze`` → after ``gc.collect()`` (and ``gc.freeze()``), forgetting the
  pauses so far;
- ``gc_take`` → ``gc``: the collector's pauses since the last take;
- ``raw_start`` with ``amqp_url``, ``work``, ``threads``, ``indices`` → once consuming;
- ``raw_stop`` → once closed;
- ``stop`` (or the end of stdin, SIGTERM, SIGINT): the agents stop as SIGTERM stops
  ``tillsync-agent run``, then the process exits.

Between replies it writes arrivals, every few milliseconds while there are some:
``{"arrivals": [[version, index, perf_counter, source], …]}`` for the agents' probe item,
``{"raw": [[message_id, index, perf_counter], …]}`` for the raw consumers. ``perf_counter``
is the system's monotonic clock: the bench compares it with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
from pathlib import Path
from typing import IO, Any

from _setup import take_stdout
from downward import Fleet, GcPauses, Probe, RawConsumers
from tillsync_agent.logs import configure_logging
from tillsync_agent.process import GC_THRESHOLDS, shorten_switch_interval
from tillsync_central.provisioning import Enrollment

FLUSH_S = 0.002


class Events:
    """Arrivals, written to the bench in batches: one line per kind every ``FLUSH_S``."""

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._rows: dict[str, list[list[Any]]] = {"arrivals": [], "raw": []}
        self._scheduled = False

    def add(self, kind: str, row: list[Any]) -> None:
        self._rows[kind].append(row)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_S, self.flush)

    def flush(self) -> None:
        self._scheduled = False
        for kind, rows in self._rows.items():
            if rows:
                self._out.write(json.dumps({kind: rows}) + "\n")
                rows.clear()
        self._out.flush()

    def reply(self, ok: bool = True, **fields: Any) -> None:
        self.flush()
        self._out.write(json.dumps({"ok": ok, **fields}) + "\n")
        self._out.flush()


class StreamingProbe(Probe):
    """The probe of this process's agents: each arrival goes to the bench."""

    def __init__(self, events: Events) -> None:
        super().__init__()
        self._events = events

    def record(self, version: int, index: int, at: float, source: str) -> None:
        self._events.add("arrivals", [version, index, at, source])


class Child:
    def __init__(self, config: dict[str, Any], events: Events) -> None:
        self.events = events
        self.fleet = Fleet(
            Path(config["data_dir"]), int(config["sqlite_gate"]), probe=StreamingProbe(events)
        )
        self.gc_pauses = GcPauses()
        self.raw: RawConsumers | None = None

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        name = command.get("cmd")
        if name == "ready":
            return {"pid": os.getpid()}
        if name == "add":
            enrollments = [Enrollment(**fields) for fields in command["enrollments"]]
            agents = await self.fleet.add(enrollments, indices=command["indices"])
            return {"database_paths": [str(a.settings.database_path) for a in agents]}
        if name == "reconnects":
            return {"reconnects": await self.fleet.reconnects()}
        if name == "settle":
            self.gc_pauses.settle(bool(command["freeze"]))
            self.gc_pauses.take()
            return {}
        if name == "gc_take":
            return {"gc": self.gc_pauses.take()}
        if name == "raw_start":
            indices = [int(i) for i in command["indices"]]
            self.raw = RawConsumers(
                command["amqp_url"],
                Path(command["work"]),
                min(len(indices), int(command["threads"])),
                lambda msg_id, index, at: self.events.add("raw", [msg_id, index, at]),
            )
            await self.raw.start(indices)
            return {}
        if name == "raw_stop":
            if self.raw is not None:
                await self.raw.close()
                self.raw = None
            return {}
        raise ValueError(f"unknown command {name!r}")


async def serve(config: dict[str, Any], out: IO[str]) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, main.cancel)
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    events = Events(out)
    child = Child(config, events)
    gc.callbacks.append(child.gc_pauses)
    try:
        while line := await reader.readline():
            if not line.strip():
                continue
            command = json.loads(line)
            if command.get("cmd") == "stop":
                break
            try:
                events.reply(**await child.handle(command))
            except Exception as exc:  # the bench reports it and stops us
                events.reply(False, error=f"{type(exc).__name__}: {exc}")
    finally:
        if child.raw is not None:
            await child.raw.close()
        await child.fleet.stop()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    config = json.loads(argv[1])
    out = take_stdout()
    configure_logging("console", "warning")
    shorten_switch_interval()  # as the bench sets its own process
    if config["gc_freeze"]:
        gc.set_threshold(*GC_THRESHOLDS)
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(serve(config, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
