"""``tillsync-central run`` started while PostgreSQL or RabbitMQ cannot be reached: it
waits (a log line per try, capped backoff, no traceback), comes up when they do, and
ingests; SIGTERM while it waits ends it cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.documents import receipt
from e2e.conftest import BIN, Central, agent_settings, new_central, running_agent, wait_for
from faults import FaultProxy
from register_ids import reg
from services import RabbitApi, Services


@contextlib.asynccontextmanager
async def central_behind_proxies(
    services: Services,
    rabbitmq_api: RabbitApi,
    amqp_url: str,
    database_url: str,
    tmp_path: Path,
) -> AsyncIterator[tuple[Central, FaultProxy, FaultProxy]]:
    """A central whose process reaches PostgreSQL and RabbitMQ only through two proxies,
    both cut; the test's own pool and management client go direct."""
    db = urlsplit(database_url)
    async with (
        FaultProxy(db.hostname or "127.0.0.1", db.port or 5432) as db_proxy,
        FaultProxy("127.0.0.1", urlsplit(amqp_url).port or 5672) as amqp_proxy,
    ):
        db_proxy.cut()
        amqp_proxy.cut()
        # Every step of the clean-up runs, last pushed first, even when one before it
        # raises (kill() times out): the registers' broker users must not outlive the test.
        async with contextlib.AsyncExitStack() as cleanup:
            central = await new_central(
                cleanup,
                services,
                rabbitmq_api,
                amqp_url=amqp_url,
                database_url=database_url,
                log_path=tmp_path / "central.log",
                extra_env={
                    "TILLSYNC_AMQP_URL": amqp_proxy.url_for(amqp_url),
                    "TILLSYNC_DATABASE_URL": db_proxy.url_for(database_url),
                },
                pool_size=2,
            )
            cleanup.callback(central.kill)
            with central.log_path.open("ab") as log:
                central.process = await asyncio.to_thread(
                    subprocess.Popen,
                    [str(BIN / "tillsync-central"), "run"],
                    env=central.env(),
                    stdout=log,
                    stderr=log,
                )
            yield central, db_proxy, amqp_proxy


def _lines(central: Central, event: str) -> int:
    text = central.log_path.read_text(errors="replace")
    return sum(f'"event": "{event}"' in line for line in text.splitlines())


async def _logged(central: Central, event: str, times: int = 1) -> None:
    async def seen() -> bool:
        assert central.process is not None
        assert central.process.poll() is None, f"central exited: {central.log()}"
        return _lines(central, event) >= times

    await wait_for(seen, timeout=60, what=f"{times} × {event!r} in central's log")


async def test_central_waits_for_postgresql_then_rabbitmq_then_ingests(
    services: Services,
    rabbitmq_api: RabbitApi,
    fresh_vhost: str,
    make_database: Any,
    tmp_path: Path,
) -> None:
    database_url = await make_database()
    async with central_behind_proxies(
        services, rabbitmq_api, fresh_vhost, database_url, tmp_path
    ) as (central, db_proxy, amqp_proxy):
        # PostgreSQL first (migrations), tried again and again, not given up on.
        await _logged(central, "PostgreSQL not reachable yet, waiting", times=2)
        db_proxy.heal()
        await _logged(central, "RabbitMQ not reachable yet, waiting", times=2)
        amqp_proxy.heal()
        await wait_for(central._consuming, timeout=60, what="central's ingest workers to consume")

        enrollment = await central.provision("c-1", reg("r-up"))
        async with running_agent(agent_settings(enrollment, tmp_path / "agent")) as agent:
            for i in range(20):
                await agent.submit("receipt", receipt(100 + i, receipt_no=f"R-{i}"))

            async def drained() -> bool:
                return agent.outbox.counts.pending == 0

            await wait_for(drained, timeout=60, what="the register to drain")
        assert await central.seqs(enrollment.register_id) == list(range(1, 21))
        assert await central.stop() == 0
    log = central.log_path.read_text(errors="replace")
    assert "Traceback" not in log
    assert _lines(central, "PostgreSQL reachable") >= 1
    assert _lines(central, "RabbitMQ reachable") == 1


async def test_sigterm_while_waiting_for_postgresql_exits_cleanly(
    services: Services,
    rabbitmq_api: RabbitApi,
    fresh_vhost: str,
    make_database: Any,
    tmp_path: Path,
) -> None:
    database_url = await make_database()
    async with central_behind_proxies(
        services, rabbitmq_api, fresh_vhost, database_url, tmp_path
    ) as (central, _, _):
        await _logged(central, "PostgreSQL not reachable yet, waiting")
        assert central.process is not None
        central.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(central.process.wait, 15)
        assert code == 0, central.log()
        assert _lines(central, "central stopped before it started") == 1
        assert "Traceback" not in central.log_path.read_text(errors="replace")


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port}"
    return parts._replace(netloc=netloc).geturl()


async def test_a_refused_login_stops_run_with_a_config_error_instead_of_waiting(
    fresh_vhost: str, make_database: Any
) -> None:
    """Waiting cannot cure a wrong password: one line naming the setting, exit 1."""
    database_url = await make_database()
    cases = {
        "database_url": {
            "TILLSYNC_DATABASE_URL": _with_password(database_url, "wrong"),
            "TILLSYNC_AMQP_URL": fresh_vhost,
        },
        "amqp_url": {
            "TILLSYNC_DATABASE_URL": database_url,
            "TILLSYNC_AMQP_URL": _with_password(fresh_vhost, "wrong"),
        },
    }
    for field, env in cases.items():
        finished = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "tillsync-central"), "run"],
            env={**os.environ, **env, "TILLSYNC_ADMIN_IN_RUN": "false"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert finished.returncode == 1, finished.stderr
        assert f"code=config_error field={field}" in finished.stderr
        assert "Traceback" not in finished.stderr
