"""A register enrolled with one command, run as the real ``tillsync-agent run`` process and
driven only through its local HTTP API and its CLI: it sells while the network comes and
goes, its history shows each documents sync, a central catalog edit reaches its event
stream, SIGTERM stops it cleanly and a restart finds everything as it was. Central must
hold every document exactly once, and no secret may show in its status or its log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import stat
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from agent.documents import receipt
from e2e.conftest import BIN, Central, agent_env, wait_for
from faults.proxy import FaultProxy
from register_ids import reg
from tillsync_central.catalog import CatalogEditor

FAST = {
    "ack_timeout_s": 3,
    "publish_timeout_s": 3,
    "retry_base_s": 0.2,
    "retry_cap_s": 1,
    "reconnect_base_s": 0.2,
    "reconnect_cap_s": 1,
    "log_format": "json",
}


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "tillsync-agent"),
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or agent_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class Till:
    """The running agent process and an HTTP client on its API."""

    def __init__(self, config: Path, env: dict[str, str], log: Path, port: int) -> None:
        self.config = config
        self.env = env
        self.log = log
        self.process: asyncio.subprocess.Process | None = None
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60)

    async def start(self, token: str) -> None:
        with self.log.open("ab") as handle:
            self.process = await asyncio.create_subprocess_exec(
                str(BIN / "tillsync-agent"),
                "run",
                "--config",
                str(self.config),
                stdout=handle,
                stderr=handle,
                env=self.env,
            )
        self.http.headers["Authorization"] = f"Bearer {token}"

        async def serving() -> bool:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AssertionError(f"the agent exited: {self.log.read_text()[-2000:]}")
            try:
                return (await self.http.get("/v1/status")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(serving, timeout=30, what="the agent's local API")

    async def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), timeout=30)

    async def status(self) -> dict[str, Any]:
        response = await self.http.get("/v1/status")
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def sell(self, n: int, start: int) -> list[int]:
        """``n`` receipts: half one by one, half as one array; returns their seqs."""
        seqs = []
        for i in range(n // 2):
            response = await self.http.post(
                "/v1/documents", json={"type": "receipt", "body": receipt(100 + start + i)}
            )
            assert response.status_code == 201, response.text
            seqs.append(response.json()["seq"])
        batch = [{"type": "receipt", "body": receipt(200 + start + i)} for i in range(n - n // 2)]
        response = await self.http.post("/v1/documents", json=batch)
        assert response.status_code == 201, response.text
        seqs.extend(r["seq"] for r in response.json()["results"])
        return seqs

    async def drained(self) -> None:
        async def zero() -> bool:
            return (await self.status())["pending"] == 0

        await wait_for(zero, timeout=60, what="pending to reach 0")

    async def connected(self, value: bool) -> None:
        async def link() -> bool:
            return (await self.status())["connected"] is value

        await wait_for(link, timeout=30, what=f"connected to be {value}")


@contextlib.asynccontextmanager
async def events(till: Till) -> AsyncIterator[AsyncIterator[tuple[str, dict[str, Any]]]]:
    """The agent's server-sent events, parsed, once the stream is ready."""
    async with till.http.stream("GET", "/v1/events") as response:
        assert response.status_code == 200

        async def parse() -> AsyncIterator[tuple[str, dict[str, Any]]]:
            name = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    yield name, json.loads(line.removeprefix("data: "))

        stream = parse()
        name, _ = await asyncio.wait_for(anext(stream), 10)
        assert name == "ready"
        yield stream


async def test_an_enrolled_register_sells_through_its_api_while_the_link_comes_and_goes(
    central: Central, tmp_path: Path
) -> None:
    enrollment = await central.provision("c-1", reg("r-svc"))
    bundle = tmp_path / "bundle.toml"
    bundle.write_text(enrollment.agent_config())
    config, data = tmp_path / "etc" / "agent.toml", tmp_path / "data"
    port = _free_port()

    # Enroll with one command; the config is private and holds a generated token.
    code, out, err = await cli(
        "enroll", str(bundle), "--config", str(config), "--data-dir", str(data),
        "--api-port", str(port),
    )  # fmt: skip
    assert code == 0, err
    assert f"enrolled register {enrollment.register_id} of center c-1" in out
    assert enrollment.password not in out + err
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    code, token, err = await cli("api-token", "--config", str(config))
    assert code == 0, err
    token = token.strip()
    assert len(token) >= 32
    assert token in config.read_text()
    assert token not in out
    # Another register's bundle does not replace this one.
    other = tmp_path / "other.toml"
    other.write_text(enrollment.agent_config().replace(enrollment.register_id, reg("r-other")))
    code, _, err = await cli("enroll", str(other), "--config", str(config))
    assert code == 2
    assert "already_enrolled" in err
    # Enrolling the same register again keeps the token.
    code, _, err = await cli("enroll", str(bundle), "--config", str(config))
    assert code == 0, err
    assert token in config.read_text()

    parts = urlsplit(enrollment.amqp_url)
    async with FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy:
        # The broker is reached through a fault proxy (the environment overrides the URL).
        env = agent_env(amqp_url=proxy.url_for(enrollment.amqp_url), **FAST)
        till = Till(config, env, tmp_path / "agent.log", port)
        async with till.http:
            await till.start(token)
            async with httpx.AsyncClient() as anonymous:
                response = await anonymous.get(f"http://127.0.0.1:{port}/v1/status")
            assert response.status_code == 401
            await till.connected(True)
            sold = await till.sell(20, 0)
            assert sold == list(range(1, 21))
            await till.drained()

            # The link goes: sales go on, pending is exact, a documents sync fails.
            proxy.cut()
            await till.connected(False)
            sold += await till.sell(30, 100)
            status = await till.status()
            assert (status["pending"], status["last_seq"]) == (30, 50)
            response = await till.http.post("/v1/sync/documents")
            assert response.status_code == 200
            failed = response.json()
            assert (failed["result"], failed["sent"]) == ("failed", 0)
            assert failed["errors"][0].startswith("not connected")
            assert enrollment.password not in response.text

            # It comes back: everything drains; then it comes and goes while selling.
            proxy.heal()
            await till.drained()
            for round_no in range(3):
                sold += await till.sell(10, 1000 + 100 * round_no)
                proxy.cut()
                sold += await till.sell(10, 1050 + 100 * round_no)
                await asyncio.sleep(0.3)
                proxy.heal()
            await till.connected(True)
            sold += await till.sell(6, 5000)
            response = await till.http.post("/v1/sync/documents")
            assert response.status_code == 200, response.text
            assert response.json()["result"] == "successful", response.text
            await till.drained()
            assert sold == list(range(1, len(sold) + 1))

            # A catalog change made centrally reaches the event stream, then the replica.
            async with events(till) as stream:
                editor = CatalogEditor(central.pool, changed_by="test")
                item = {"name": "Káva", "gross_price": 4900, "currency": "CZK"}
                await editor.upsert("global", "items", "kava", {**item, "tax_rate_id": "cz-12"})

                async def catalog_event() -> dict[str, Any]:
                    async for name, data in stream:
                        if name == "catalog" and data["key"] == "kava":
                            return data
                    raise AssertionError("the event stream ended")

                change = await asyncio.wait_for(catalog_event(), 30)
                assert (change["entity"], change["op"], change["source"]) == (
                    "items",
                    "upsert",
                    "change",
                )
            response = await till.http.get("/v1/catalog/items/kava")
            assert response.status_code == 200
            assert response.json()["price"]["gross_price"] == 4900

            # The history shows the documents syncs, through the API and the CLI.
            code, out, err = await cli(
                "history", "--json", "--kind", "documents", "--config", str(config), env=env
            )
            assert code == 0, err
            runs = json.loads(out)
            results = [(r["detail"]["trigger"], r["result"]) for r in runs]
            assert results[0] == ("manual", "successful")
            assert ("manual", "failed") in results
            assert results[-1] == ("start-up", "successful")
            api_runs = (await till.http.get("/v1/history?kind=documents")).json()["runs"]
            assert [r["id"] for r in api_runs] == [r["id"] for r in runs]

            # No secret in status (API and CLI) or in the log.
            code, cli_status, err = await cli("status", "--json", "--config", str(config), env=env)
            assert code == 0, err
            assert json.loads(cli_status)["running"] is True
            api_status = (await till.http.get("/v1/status")).text
            for text in (cli_status, api_status, till.log.read_text()):
                assert enrollment.password not in text
                assert token not in text

            # SIGTERM: drains and exits 0; the CLI still reads the state.
            assert await till.stop() == 0
            code, out, err = await cli("status", "--json", "--config", str(config), env=env)
            assert code == 0, err
            offline = json.loads(out)
            assert (offline["running"], offline["pending"], offline["last_seq"]) == (
                False,
                0,
                len(sold),
            )

            # A restart finds everything as it was, and goes on from the next seq.
            started = time.monotonic()
            await till.start(token)
            status = await till.status()
            assert (status["last_seq"], status["acknowledged"], status["rejected"]) == (
                len(sold),
                len(sold),
                0,
            )
            assert time.monotonic() - started < 30
            sold += await till.sell(2, 9000)
            await till.drained()
            history = (await till.http.get("/v1/history?kind=documents&limit=100")).json()
            assert len(history["runs"]) == len(runs) + 1  # the new start-up sweep
            assert await till.stop() == 0

    assert sold == list(range(1, len(sold) + 1))
    assert await central.seqs(enrollment.register_id) == sold
    log = till.log.read_text()
    assert "agent stopped" in log
    assert enrollment.password not in log


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
