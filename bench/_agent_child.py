"""One register's agent in a process of its own, driven by ``bench/upward.py --agent-processes``.

    python bench/_agent_child.py '{"register_id": …, "center_id": …, "amqp_url": …,
                                   "data_dir": …, "seed": 0}'

It opens the agent as the bench opens an in-process one (``tillsync_agent.Agent`` with the
production defaults, no control socket), in a process tuned as ``tillsync-agent run`` tunes
its own (``tillsync_agent.process.tune_gc``: start-up objects frozen, GC thresholds
raised), then answers commands, one JSON object a line on
stdin, with one JSON line each on stdout (everything else, the agent's warnings included,
goes to stderr):

- ``{"cmd": "generate", "count": N}``: N documents from the simulated till, made ahead of
  the clock → ``{"ok": true}``
- ``{"cmd": "submit_all", "concurrency": C}``: submit them with C submits waiting →
  ``{"ok": true, "submit_s": …}``
- ``{"cmd": "submit_paced", "rate": r, "offset_s": o}``: submit them at r documents/s, the
  first after o seconds → ``{"ok": true, "paced_s": …}``
- ``{"cmd": "drain", "timeout_s": t}``: until nothing is pending → ``{"ok": true,
  "drained": bool}``
- ``{"cmd": "status"}`` → ``{"ok": true, "last_seq", "pending", "rejected", "reconnects"}``
- ``{"cmd": "stop"}``, end of stdin, SIGTERM or SIGINT: stops the agent as SIGTERM stops
  ``tillsync-agent run``, then exits.

The first line it writes is ``{"ok": true, "ready": true, "database_path": …, "pid": …}``
once the agent's link is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import IO, Any

from _setup import submit_all, take_stdout
from tillsync_agent import Agent, load_settings
from tillsync_agent.logs import configure_logging
from tillsync_agent.process import shorten_switch_interval, tune_gc
from tillsync_agent.simulator import Till

POLL_S = 0.005
LINK_TIMEOUT_S = 30.0


class Child:
    def __init__(self, agent: Agent, till: Till, out: IO[str]) -> None:
        self.agent = agent
        self.till = till
        self.out = out
        self.docs: list[tuple[str, dict[str, Any]]] = []

    def reply(self, **fields: Any) -> None:
        self.out.write(json.dumps({"ok": True, **fields}) + "\n")
        self.out.flush()

    async def handle(self, command: dict[str, Any]) -> bool:
        """Run one command and answer it; False on ``stop``."""
        name = command.get("cmd")
        if name == "stop":
            return False
        if name == "generate":
            self.docs = [self.till.next_document() for _ in range(int(command["count"]))]
            self.reply()
        elif name == "submit_all":
            self.reply(submit_s=await self.submit_all(int(command["concurrency"])))
        elif name == "submit_paced":
            paced_s = await self.submit_paced(
                float(command["rate"]), float(command.get("offset_s", 0.0))
            )
            self.reply(paced_s=paced_s)
        elif name == "drain":
            self.reply(drained=await self.drain(float(command["timeout_s"])))
        elif name == "status":
            counts = self.agent.outbox.counts
            self.reply(
                last_seq=counts.last_seq,
                pending=counts.pending,
                rejected=counts.rejected,
                reconnects=self.agent.link.state.reconnects,
            )
        else:
            self.out.write(json.dumps({"ok": False, "error": f"unknown command {name!r}"}) + "\n")
            self.out.flush()
        return True

    async def submit_all(self, concurrency: int) -> float:
        """As the in-process bench: ``concurrency`` submitters sharing one iterator."""
        start = time.perf_counter()
        await submit_all(self.agent.submit, self.docs, concurrency)
        return time.perf_counter() - start

    async def submit_paced(self, rate: float, offset_s: float) -> float:
        """Document k is submitted at ``offset_s + k / rate`` without waiting for the
        earlier ones (as the in-process bench paces its submits)."""
        loop = asyncio.get_running_loop()
        start = loop.time() + offset_s
        total = len(self.docs)
        sent = 0
        async with asyncio.TaskGroup() as group:
            while sent < total:
                elapsed = loop.time() - start
                due = 0 if elapsed < 0 else min(total, int(elapsed * rate) + 1)
                while sent < due:
                    group.create_task(self.agent.submit(*self.docs[sent]))
                    sent += 1
                await asyncio.sleep(0.002)
        return loop.time() - start

    async def drain(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.agent.outbox.counts.pending:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True


async def serve(config: dict[str, Any], out: IO[str]) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, main.cancel)
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    busy = False  # a command is running

    async def read_commands() -> None:
        while line := await reader.readline():
            if line.strip():
                commands.put_nowait(json.loads(line))
        # The bench is gone (or closed our stdin): stop, whatever we are doing; when
        # already stopping, let the agent's drain finish.
        commands.put_nowait(None)
        if busy:
            main.cancel()

    reading = asyncio.create_task(read_commands())
    settings = load_settings(
        None,
        register_id=config["register_id"],
        center_id=config["center_id"],
        amqp_url=config["amqp_url"],
        data_dir=Path(config["data_dir"]),
    )
    try:
        async with Agent(settings, serve_socket=False) as agent:
            running = asyncio.create_task(agent.run())
            try:
                deadline = time.monotonic() + LINK_TIMEOUT_S
                while not agent.link.state.connected:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the agent did not connect within 30 s")
                    await asyncio.sleep(0.05)
                child = Child(agent, Till(config["register_id"], seed=int(config["seed"])), out)
                child.reply(ready=True, database_path=str(settings.database_path), pid=os.getpid())
                while (command := await commands.get()) is not None:
                    busy = True
                    if not await child.handle(command):
                        break
                    busy = False
            finally:
                busy = False
                agent.stop()
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(running), timeout=30)
    finally:
        reading.cancel()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    config = json.loads(argv[1])
    out = take_stdout()
    configure_logging("console", "warning")
    tune_gc()  # as `tillsync-agent run` does: what a deployed agent's process runs with
    shorten_switch_interval()
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(serve(config, out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
