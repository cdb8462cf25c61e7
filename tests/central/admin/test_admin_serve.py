"""Serving the admin API: ``tillsync-central api`` alone (migrates, serves, stops on
SIGTERM), and ``tillsync-central run`` whose admin port is taken (the workers still run,
the error is logged)."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tillsync_central.settings import CentralSettings

BIN = Path(sys.executable).parent


def _env(settings: CentralSettings, **extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("TILLSYNC_")}
    env.update(
        {
            "TILLSYNC_AMQP_URL": settings.amqp_url.get_secret_value(),
            "TILLSYNC_DATABASE_URL": settings.database_url.get_secret_value(),
            "TILLSYNC_RABBITMQ_API_URL": settings.rabbitmq_api_url.get_secret_value(),
            "TILLSYNC_LOG_FORMAT": "json",
            **extra,
        }
    )
    return env


def _tail(log: Path, size: int = 3000) -> str:
    return log.read_text(errors="replace")[-size:]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _wait_health(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(300):
            if process.poll() is not None:
                raise AssertionError(f"exited {process.returncode}: {_tail(log)}")
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never answered: {_tail(log)}")


async def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    for _ in range(300):
        if process.poll() is not None:
            return process.returncode
        await asyncio.sleep(0.1)
    process.kill()
    raise AssertionError("did not stop within 30 s of SIGTERM")


async def test_the_api_command_serves_alone_and_stops_on_sigterm(
    settings: CentralSettings, tmp_path: Path
) -> None:
    port = _free_port()
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        process = await asyncio.to_thread(
            subprocess.Popen,
            [str(BIN / "tillsync-central"), "api", "--port", str(port)],
            env=_env(settings),
            stdout=out,
            stderr=out,
        )
    try:
        await _wait_health(f"http://127.0.0.1:{port}/api/health", process, log)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            login = await client.get("/fleet")
            assert login.status_code == 303
            assert login.headers["location"] == "/login?next=/fleet"
            assert (await client.get("/login")).status_code == 200
            assert (await client.get("/static/app.js")).status_code == 200
    finally:
        code = await _stop(process)
    text = _tail(log)
    assert code == 0, text
    assert '"admin api listening"' in text


async def test_the_api_command_refuses_a_taken_port(
    settings: CentralSettings, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = await asyncio.to_thread(
            subprocess.run,
            [str(BIN / "tillsync-central"), "api", "--port", str(port)],
            env=_env(settings),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode == 1
    assert "code=config_error field=admin_port" in done.stderr


async def test_run_keeps_its_workers_when_the_admin_port_is_taken(
    settings: CentralSettings, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        metrics_port = _free_port()
        with log.open("wb") as out:
            process = await asyncio.to_thread(
                subprocess.Popen,
                [str(BIN / "tillsync-central"), "run"],
                env=_env(
                    settings,
                    TILLSYNC_ADMIN_PORT=str(port),
                    TILLSYNC_METRICS_PORT=str(metrics_port),
                ),
                stdout=out,
                stderr=out,
            )
        try:
            # The workers run: the metrics listener (started with them) answers.
            await _wait_health(f"http://127.0.0.1:{metrics_port}/metrics", process, log)
            for _ in range(100):
                if "admin api not served" in _tail(log, 10**7):
                    break
                await asyncio.sleep(0.1)
        finally:
            code = await _stop(process)
    text = _tail(log, 10**7)
    assert code == 0, text[-3000:]
    assert "admin api not served" in text
    assert '"field": "admin_port"' in text
