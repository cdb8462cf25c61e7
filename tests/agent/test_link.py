"""The agent's link on a silent network: each connect attempt that times out closes its
connection itself. aio-pika leaves a failed connection open for the garbage collector,
which closes it later, or warns that ``Connection.close`` was never awaited when no event
loop is running then."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from amqp_connections import watch_connections
from tillsync_agent import link
from tillsync_agent.service import Agent
from tillsync_agent.settings import load_settings


async def test_a_connect_attempt_that_times_out_closes_its_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(link, "CONNECT_TIMEOUT_S", 0.3)
    made = watch_connections(monkeypatch)
    accepted: list[float] = []
    closed: asyncio.Queue[None] = asyncio.Queue()

    async def silent_broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Reads the client's protocol header and never answers, as a link that went quiet.
        accepted.append(asyncio.get_running_loop().time())
        await reader.read()  # until EOF: the agent closed its end
        closed.put_nowait(None)
        writer.close()

    server = await asyncio.start_server(silent_broker, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = load_settings(
        None,
        register_id="r-1",
        center_id="c-1",
        amqp_url=f"amqp://reg-r-1:secret@127.0.0.1:{port}/",
        data_dir=tmp_path,
        reconnect_base_s=0.5,  # the next attempt 0.25-0.5 s after the last
        reconnect_cap_s=0.5,
    )
    try:
        async with Agent(settings, serve_socket=False) as agent:
            task = asyncio.create_task(agent.run())
            try:
                for _ in range(3):  # three attempts, each given up
                    await asyncio.wait_for(closed.get(), timeout=10)
                    await asyncio.sleep(0.05)  # the attempt's close runs on
                    assert made
                    assert all(c.is_closed for c in made), "a connection left open"
                assert not agent.link.state.connected
                assert agent.link.state.reconnects >= 2
                assert "Timeout" in (agent.link.state.last_error or "")
            finally:
                agent.stop()
                await asyncio.wait_for(task, timeout=30)
    finally:
        server.close()
        await server.wait_closed()
    assert len(accepted) >= 3
