"""The demo: central plus a simulated fleet of 3 centers x 4 registers selling steadily.

    deploy/dev/demo            (starts the services, then runs this)

It starts ``tillsync-central run`` as a subprocess, enrolls the registers through the real
management API, runs one in-process agent per register with a simulated till, and prints
each register's pending count and the documents central stored, live. Ctrl-C stops it
cleanly: the agents drain, central gets SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tillsync_agent import Agent, load_settings
from tillsync_agent.logs import configure_logging
from tillsync_agent.simulator import Till
from tillsync_central.management import Management, vhost_of
from tillsync_central.provisioning import Enrollment, add_register
from tillsync_central.settings import load_settings as load_central_settings

BIN = Path(sys.executable).parent
console = Console()


async def wait_consuming(central: subprocess.Popen[bytes], pool: asyncpg.Pool) -> None:
    """Central is ready once it has migrated (the registers table exists) and declared topology."""
    for _ in range(600):
        if central.poll() is not None:
            raise SystemExit(f"tillsync-central run exited with {central.returncode}")
        with contextlib.suppress(asyncpg.PostgresError):
            if await pool.fetchval("SELECT to_regclass('registers') IS NOT NULL"):
                await asyncio.sleep(2)  # topology is declared right after the migration
                return
        await asyncio.sleep(0.1)
    raise SystemExit("central did not become ready in 60 s")


async def sell(agent: Agent, till: Till, rate: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        doc_type, body = till.next_document()
        await agent.submit(doc_type, body)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1 / rate)


def table(agents: list[Agent], stored: dict[str, int], started: float) -> Table:
    out = Table(title=f"tillsync demo — {time.monotonic() - started:.0f} s (Ctrl-C stops)")
    for column in (
        "center",
        "register",
        "link",
        "submitted",
        "pending",
        "acknowledged",
        "stored at central",
    ):
        out.add_column(
            column, justify="right" if column not in ("center", "register", "link") else "left"
        )
    for agent in agents:
        counts = agent.outbox.counts
        out.add_row(
            agent.settings.center_id,
            agent.settings.register_id,
            "[green]up[/green]" if agent.link.state.connected else "[red]down[/red]",
            str(counts.last_seq),
            str(counts.pending),
            str(counts.acknowledged),
            str(stored.get(agent.settings.register_id, 0)),
        )
    total = sum(a.outbox.counts.last_seq for a in agents)
    pending = sum(a.outbox.counts.pending for a in agents)
    out.add_row("", "[b]all[/b]", "", str(total), str(pending), "", str(sum(stored.values())))
    return out


async def main(args: argparse.Namespace) -> None:
    configure_logging("console", "warning")  # the live table is the output
    settings = load_central_settings(None)
    data = Path(args.data_dir)
    data.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before anything runs
    amqp_url = settings.amqp_url.get_secret_value()
    log = (data / "central.log").open("ab")
    central = await asyncio.to_thread(
        subprocess.Popen, [str(BIN / "tillsync-central"), "run"], stdout=log, stderr=log
    )
    pool = await asyncpg.create_pool(
        settings.database_url.get_secret_value(), min_size=1, max_size=2
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await wait_consuming(central, pool)
        enrollments: list[Enrollment] = []
        async with Management(
            settings.rabbitmq_api_url.get_secret_value(), vhost_of(amqp_url)
        ) as api:
            for c in range(1, args.centers + 1):
                for r in range(1, args.registers + 1):
                    enrollments.append(
                        await add_register(pool, api, amqp_url, f"demo-c{c}", f"demo-c{c}-r{r}")
                    )
        async with contextlib.AsyncExitStack() as stack:
            agents = []
            for e in enrollments:
                agent_settings = load_settings(
                    None,
                    register_id=e.register_id,
                    center_id=e.center_id,
                    amqp_url=e.amqp_url,
                    data_dir=data / e.register_id,
                    log_level="warning",
                )
                agents.append(
                    await stack.enter_async_context(Agent(agent_settings, serve_socket=False))
                )
            started = time.monotonic()
            async with asyncio.TaskGroup() as group:
                for agent in agents:
                    group.create_task(agent.run())
                    till = Till(agent.settings.register_id, seed=agent.outbox.counts.last_seq)
                    group.create_task(sell(agent, till, args.rate, stop))
                with Live(console=console, refresh_per_second=2) as live:
                    while not stop.is_set():
                        rows = await pool.fetch(
                            "SELECT register_id, count(*) AS n FROM documents GROUP BY register_id"
                        )
                        live.update(
                            table(agents, {r["register_id"]: r["n"] for r in rows}, started)
                        )
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(stop.wait(), timeout=1)
                console.print("stopping: agents drain in-flight work…")
                for agent in agents:
                    agent.stop()
    finally:
        central.send_signal(signal.SIGTERM)
        central.wait(timeout=30)
        await pool.close()
        console.print(
            "central stopped; the outboxes and the database keep everything for next time."
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--centers", type=int, default=3)
    parser.add_argument("--registers", type=int, default=4, help="registers per center")
    parser.add_argument("--rate", type=float, default=2.0, help="documents per second per register")
    parser.add_argument("--data-dir", default=os.environ.get("TILLSYNC_DEMO_DIR", "var/demo"))
    asyncio.run(main(parser.parse_args()))
