"""The real ``tillsync-agent run`` process, driven only through its CLI: submitted, killed
with SIGKILL while publishing (again and again), restarted, and finally stopped with
SIGTERM. Central must hold every committed document exactly once."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
from pathlib import Path

from agent.documents import receipt
from e2e.conftest import BIN, Central, agent_env, agent_settings, wait_for, write_agent_config
from faults import FaultProxy
from register_ids import reg


async def cli(config: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(BIN / "tillsync-agent"),
        *args,
        "--config",
        str(config),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=agent_env(),
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def status(config: Path) -> dict[str, object]:
    code, out, err = await cli(config, "status", "--json")
    assert code == 0, err
    result: dict[str, object] = json.loads(out)
    return result


async def start_agent(config: Path, log: Path) -> asyncio.subprocess.Process:
    with log.open("ab") as handle:
        process = await asyncio.create_subprocess_exec(
            str(BIN / "tillsync-agent"),
            "run",
            "--config",
            str(config),
            stdout=handle,
            stderr=handle,
            env=agent_env(),
        )

    async def serving() -> bool:
        if process.returncode is not None:
            raise AssertionError(f"agent exited {process.returncode}: {log.read_text()[-2000:]}")  # noqa: ASYNC240
        try:
            return bool((await status(config))["running"])
        except AssertionError:
            return False

    await wait_for(serving, timeout=30, what="the agent's local socket")
    return process


def documents(n: int, start: int) -> bytes:
    lines = [json.dumps({"type": "receipt", "body": receipt(100 + start + i)}) for i in range(n)]
    return ("\n".join(lines) + "\n").encode()


async def test_sigkill_while_publishing_then_restart_loses_and_doubles_nothing(
    central: Central, tmp_path: Path
) -> None:
    enrollment = await central.provision("c-1", reg("r-kill"))
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        settings = agent_settings(
            enrollment, tmp_path / "data", amqp_url=proxy.url_for(enrollment.amqp_url)
        )
        config = write_agent_config(settings, tmp_path / "agent.toml")
        log = tmp_path / "agent.log"
        rng = random.Random(4)
        submitted = 0
        for round_no in range(6):
            if round_no == 5:
                # The last round's link goes silent: its documents can be neither confirmed
                # nor acknowledged before the kill, so the kill surely leaves some open.
                proxy.blackhole()
            agent = await start_agent(config, log)
            code, out, err = await cli(config, "submit", "-", stdin=documents(400, submitted))
            assert code == 0, err
            assert "stored 400 document(s)" in out
            submitted += 400
            await asyncio.sleep(rng.uniform(0.0, 0.3))  # somewhere in the middle of publishing
            agent.send_signal(signal.SIGKILL)
            assert await agent.wait() == -signal.SIGKILL
        # While the agent is down, status still answers from the database, read-only.
        offline = await status(config)
        assert offline["running"] is False
        assert offline["last_seq"] == submitted
        assert isinstance(offline["pending"], int)
        assert offline["pending"] >= 400
        proxy.heal()
        proxy.reset_all()  # connections held by the blackhole are dropped, not resumed

        agent = await start_agent(config, log)

        async def drained() -> bool:
            return (await status(config))["pending"] == 0

        await wait_for(drained, timeout=120, what="pending to reach 0 after the kills")
        agent.send_signal(signal.SIGTERM)
        # SIGTERM drains in-flight work and exits cleanly.
        assert await asyncio.wait_for(agent.wait(), timeout=30) == 0
        final = await status(config)
        assert (final["pending"], final["acknowledged"], final["rejected"]) == (0, submitted, 0)
        assert await central.seqs(enrollment.register_id) == list(range(1, submitted + 1))
        assert "agent stopped" in log.read_text()


async def test_submit_reports_bad_lines_and_keeps_the_good_ones(
    central: Central, tmp_path: Path
) -> None:
    enrollment = await central.provision("c-1", reg("r-cli"))
    config = write_agent_config(
        agent_settings(enrollment, tmp_path / "data"), tmp_path / "agent.toml"
    )
    bad_money = receipt(100)
    bad_money["total"] = 1.0
    lines = [
        json.dumps({"type": "receipt", "body": receipt(100)}),
        "this is not json",
        json.dumps({"type": "receipt", "body": bad_money}),
        json.dumps({"type": "no_such_type", "body": {}}),
        json.dumps({"type": "receipt", "body": receipt(200)}),
    ]
    # No service running: the CLI writes the outbox itself.
    code, out, err = await cli(config, "submit", stdin=("\n".join(lines) + "\n").encode())
    assert code == 1
    assert "stored 2 document(s), seq 1..2" in out
    assert "line 2: malformed" in err
    assert "line 3: float_not_allowed body.total" in err
    assert "line 4: unknown_type type" in err
    agent = await start_agent(config, tmp_path / "agent.log")
    try:

        async def drained() -> bool:
            return (await status(config))["pending"] == 0

        await wait_for(drained, timeout=60, what="the two good documents to be acknowledged")
    finally:
        agent.send_signal(signal.SIGTERM)
        await asyncio.wait_for(agent.wait(), timeout=30)
    assert await central.seqs(enrollment.register_id) == [1, 2]
