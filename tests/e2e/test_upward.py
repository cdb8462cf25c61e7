"""Documents up, end to end: agent → RabbitMQ → ingest → PostgreSQL → ack, under real faults.

Every test ends by counting both ends: the rows central stored equal the documents the
register committed, with no duplicates, and the register's pending count is 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess

import pytest

from agent.documents import receipt, shift_close
from e2e.conftest import Central, agent_settings, running_agent, wait_for
from faults import FaultProxy
from register_ids import reg
from tillsync_agent import Agent
from tillsync_agent.store import open_readonly


async def submit_receipts(agent: Agent, n: int) -> None:
    for i in range(n):
        await agent.submit("receipt", receipt(100 + i, receipt_no=f"R-{i}"))


async def assert_converged(central: Central, agent: Agent, *, timeout: float = 60) -> None:
    """Both ends agree: central stored seqs 1..last_seq exactly once; nothing pending."""

    async def drained() -> bool:
        return agent.outbox.counts.pending == 0

    await wait_for(drained, timeout=timeout, what=f"{agent.settings.register_id} to drain")
    last_seq = agent.outbox.counts.last_seq
    register = agent.settings.register_id
    assert await central.seqs(register) == list(range(1, last_seq + 1))
    assert agent.outbox.counts.acknowledged == last_seq
    assert agent.outbox.counts.rejected == 0


async def test_two_registers_happy_path(central: Central, tmp_path) -> None:
    a = await central.provision("c-1", reg("r-1"))
    b = await central.provision("c-2", reg("r-2"))
    async with (
        running_agent(agent_settings(a, tmp_path / "a")) as agent_a,
        running_agent(agent_settings(b, tmp_path / "b")) as agent_b,
    ):
        await asyncio.gather(submit_receipts(agent_a, 300), submit_receipts(agent_b, 200))
        await assert_converged(central, agent_a)
        await assert_converged(central, agent_b)
    assert await central.stored() == 500
    total = await central.pool.fetchval(
        "SELECT sum(total) FROM receipts WHERE register_id = $1", a.register_id
    )
    assert total == sum(100 + i for i in range(300))


async def test_offline_for_thousands_then_reconnect_drains_to_zero(
    central: Central, tmp_path
) -> None:
    enrollment = await central.provision("c-1", reg("r-off"))
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        proxy.refuse(True)  # the shop's network is down
        settings = agent_settings(enrollment, tmp_path, amqp_url=proxy.url_for(enrollment.amqp_url))
        async with running_agent(settings) as agent:
            await submit_receipts(agent, 3000)
            assert agent.outbox.counts.pending == 3000
            assert not agent.link.state.connected
            assert await central.stored(enrollment.register_id) == 0
            proxy.refuse(False)
            await assert_converged(central, agent, timeout=120)
    # The backlog went up in document batches (at most publish_batch_max, 50, each).
    deliveries, documents = central.ingested()
    assert documents == 3000
    assert 3000 // 50 <= deliveries <= 3000 // 10


async def test_with_publish_batch_max_1_every_document_is_a_message_of_its_own(
    central: Central, tmp_path
) -> None:
    enrollment = await central.provision("c-1", reg("r-single"))
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        proxy.refuse(True)  # a backlog, which would otherwise go in batches
        settings = agent_settings(
            enrollment,
            tmp_path,
            amqp_url=proxy.url_for(enrollment.amqp_url),
            publish_batch_max=1,
        )
        async with running_agent(settings) as agent:
            await submit_receipts(agent, 200)
            proxy.refuse(False)
            await assert_converged(central, agent)
    assert central.ingested() == (200, 200)


async def test_link_cut_and_slowed_mid_stream(central: Central, tmp_path) -> None:
    enrollment = await central.provision("c-1", reg("r-cut"))
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        settings = agent_settings(enrollment, tmp_path, amqp_url=proxy.url_for(enrollment.amqp_url))
        async with running_agent(settings) as agent:
            await submit_receipts(agent, 200)
            proxy.latency(50, jitter_ms=20)
            await submit_receipts(agent, 200)
            proxy.reset_all()  # connections die mid-stream
            await submit_receipts(agent, 200)
            proxy.cut()
            await submit_receipts(agent, 200)  # selling goes on while the link is down
            assert agent.outbox.counts.pending > 0
            proxy.heal()
            proxy.slicer(max_chunk=7, delay_ms=1)
            await submit_receipts(agent, 200)
            proxy.clear()
            await assert_converged(central, agent, timeout=120)
            assert agent.link.state.reconnects >= 1


async def test_silent_network_times_out_and_recovers(central: Central, tmp_path) -> None:
    enrollment = await central.provision("c-1", reg("r-hole"))
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        settings = agent_settings(
            enrollment, tmp_path, amqp_url=proxy.url_for(enrollment.amqp_url), publish_timeout_s=1.0
        )
        async with running_agent(settings) as agent:
            await submit_receipts(agent, 50)
            await assert_converged(central, agent)
            proxy.blackhole()  # nothing answers, nothing fails: only timeouts can tell
            await submit_receipts(agent, 50)

            async def noticed() -> bool:
                return agent.link.state.last_error is not None or agent._sender.stats.failed > 0

            await wait_for(noticed, timeout=30, what="the agent to notice the silent link")
            proxy.heal()
            proxy.reset_all()
            await assert_converged(central, agent, timeout=120)


@pytest.mark.slow
async def test_broker_stopped_and_started_mid_stream(central: Central, services, tmp_path) -> None:
    if services.rabbitmqctl is None:
        pytest.fail("this test needs rabbitmqctl for the local broker (deploy/dev/services)")
    enrollment = await central.provision("c-1", reg("r-stop"))
    async with running_agent(agent_settings(enrollment, tmp_path)) as agent:
        await submit_receipts(agent, 300)
        await wait_for(
            _stored_some(central, enrollment.register_id), timeout=30, what="first documents stored"
        )
        await rabbitmqctl(services, "stop_app")
        try:
            await submit_receipts(agent, 300)  # the outage: the register keeps selling
            assert agent.outbox.counts.pending >= 300
        finally:
            await rabbitmqctl(services, "start_app")
            await rabbitmqctl(services, "await_startup")
        await submit_receipts(agent, 300)
        await assert_converged(central, agent, timeout=180)
    assert central.process is not None
    assert central.process.poll() is None, central.log()


async def rabbitmqctl(services, command: str) -> None:
    await asyncio.to_thread(
        subprocess.run,
        [services.rabbitmqctl, command],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _stored_some(central: Central, register_id: str):
    async def check() -> bool:
        return await central.stored(register_id) > 0

    return check


async def test_resend_of_unacknowledged_after_ack_loss(central: Central, tmp_path) -> None:
    """Central dies after storing but before its acks land: the agent resends after
    ack_timeout, central deduplicates and acks again — stored once."""
    enrollment = await central.provision("c-1", reg("r-ack"))
    settings = agent_settings(enrollment, tmp_path, ack_timeout_s=1.0)
    async with running_agent(settings) as agent:
        central.kill()
        await submit_receipts(agent, 300)  # published (confirmed by the broker), not acked
        await wait_for(_published_all(agent), timeout=30, what="documents confirmed by the broker")
        assert agent.outbox.counts.pending == 300
        await central.start()
        await assert_converged(central, agent, timeout=120)


def _published_all(agent: Agent):
    async def check() -> bool:
        return agent._sender.stats.published >= agent.outbox.counts.last_seq

    return check


async def test_a_shift_close_while_its_receipts_are_in_flight_resends_none(
    central: Central, tmp_path
) -> None:
    """A shift close makes due only the shift's rows never sent or sent longer than the
    ack timeout ago: receipts whose confirms or acks are still on their way (a slow link
    keeps hundreds in flight) are published exactly once."""
    enrollment = await central.provision("c-1", reg("r-shift"))
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        settings = agent_settings(enrollment, tmp_path, amqp_url=proxy.url_for(enrollment.amqp_url))
        async with running_agent(settings) as agent:
            proxy.latency(40, jitter_ms=10)
            receipts = [("receipt", receipt(100 + i, receipt_no=f"R-{i}")) for i in range(400)]
            await agent.outbox.submit_many(receipts)
            close = await agent.submit("shift_close", shift_close(1, 1, 400, 400, 0))
            assert agent.outbox.counts.pending > 0, "the close came after everything was acked"
            await assert_converged(central, agent)
            assert close.seq == 401
        with contextlib.closing(open_readonly(settings.database_path)) as db:
            attempts = dict(db.execute("SELECT attempts, count(*) FROM outbox GROUP BY 1"))
        # 0 when central's ack overtook the sender's record of the confirm.
        assert set(attempts) <= {0, 1}, f"a document was published more than once: {attempts}"
        assert sum(attempts.values()) == 401
