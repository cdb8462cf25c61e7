"""The real ``tillsync-agent run`` and ``tillsync-central run`` speak systemd's notify
protocol: a test plays systemd with a Unix datagram socket in ``NOTIFY_SOCKET`` and a
one-second ``WATCHDOG_USEC``, and sees ``READY=1``, then ``WATCHDOG=1`` pings, then
``STOPPING=1`` on SIGTERM and a clean exit."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from e2e.conftest import BIN, Central, agent_settings, write_agent_config
from register_ids import reg


class FakeSystemd:
    """The receiving end of ``NOTIFY_SOCKET``: every datagram, with when it arrived."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.messages: list[tuple[float, str]] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self._socket.setblocking(False)
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeSystemd:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._reader is not None
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        self._socket.close()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._socket, 4096)
            for line in data.decode().splitlines():
                self.messages.append((time.monotonic(), line))

    def states(self) -> list[str]:
        return [state for _, state in self.messages]

    async def wait_for(self, state: str, *, count: int = 1, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.states().count(state) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count}× {state} within {timeout} s: {self.states()}")
            await asyncio.sleep(0.05)


def watchdog_env(address: str) -> dict[str, str]:
    # One second: systemd's rule of thumb is to ping at half of it.
    return {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}


async def test_agent_run_tells_systemd_ready_watchdog_and_stopping(
    central: Central, tmp_path: Path
) -> None:
    enrollment = await central.provision("c-1", reg("r-systemd"))
    settings = agent_settings(enrollment, tmp_path / "data")
    config = write_agent_config(settings, tmp_path / "agent.toml")
    log = tmp_path / "agent.log"
    async with FakeSystemd(str(tmp_path / "notify.sock")) as systemd:
        with log.open("ab") as handle:
            process = await asyncio.create_subprocess_exec(
                str(BIN / "tillsync-agent"),
                "run",
                "--config",
                str(config),
                env={**os.environ, **watchdog_env(systemd.address)},
                stdout=handle,
                stderr=handle,
            )
        try:
            await systemd.wait_for("READY=1", timeout=30)
            # Ready means served: the local socket is there for the POS app.
            assert settings.socket_path.exists()
            await systemd.wait_for("WATCHDOG=1", count=3, timeout=10)
            ready_at = next(t for t, s in systemd.messages if s == "READY=1")
            pings = [t for t, s in systemd.messages if s == "WATCHDOG=1"]
            assert all(t >= ready_at for t in pings)
            # Half the period apart, give or take the scheduler.
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert all(0.3 < gap < 0.9 for gap in gaps), gaps
            assert "STOPPING=1" not in systemd.states()

            process.send_signal(signal.SIGTERM)
            await systemd.wait_for("STOPPING=1", timeout=10)
            assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    states = systemd.states()
    assert states[0] == "READY=1", states
    assert states.index("STOPPING=1") > states.index("WATCHDOG=1")
    assert states.count("READY=1") == 1


async def test_agent_watchdog_for_another_pid_is_not_ours(central: Central, tmp_path: Path) -> None:
    """``WATCHDOG_PID`` names the process the watchdog is meant for: a child (or a wrapper
    script's child) that is not it sends READY but no pings."""
    enrollment = await central.provision("c-1", reg("r-systemd-pid"))
    config = write_agent_config(
        agent_settings(enrollment, tmp_path / "data"), tmp_path / "agent.toml"
    )
    address = f"@tillsync-test-{secrets.token_hex(6)}"  # Linux's abstract namespace
    async with FakeSystemd(address) as systemd:
        process = await asyncio.create_subprocess_exec(
            str(BIN / "tillsync-agent"),
            "run",
            "--config",
            str(config),
            env={**os.environ, **watchdog_env(address), "WATCHDOG_PID": "1"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await systemd.wait_for("READY=1", timeout=30)
            await asyncio.sleep(1.5)
            assert "WATCHDOG=1" not in systemd.states()
        finally:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), timeout=30) == 0
        await systemd.wait_for("STOPPING=1", timeout=5)


async def test_central_run_tells_systemd_ready_watchdog_and_stopping(
    central: Central, tmp_path: Path
) -> None:
    log = tmp_path / "central-systemd.log"
    async with FakeSystemd(str(tmp_path / "notify.sock")) as systemd:
        # A second central process on the same vhost and database, as a unit would run it.
        with log.open("ab") as handle:
            process = await asyncio.to_thread(
                subprocess.Popen,
                [str(BIN / "tillsync-central"), "run"],
                env={**central.env(), **watchdog_env(systemd.address)},
                stdout=handle,
                stderr=handle,
            )
        try:
            await systemd.wait_for("READY=1", timeout=60)
            await systemd.wait_for("WATCHDOG=1", count=2, timeout=10)
            process.send_signal(signal.SIGTERM)
            await systemd.wait_for("STOPPING=1", timeout=10)
            assert await asyncio.to_thread(process.wait, 30) == 0, log.read_text()[-2000:]
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    states = systemd.states()
    assert states[0] == "READY=1", states
    assert "central starting" in log.read_text()
