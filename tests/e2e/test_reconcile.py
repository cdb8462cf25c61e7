"""Invariant 6 end to end: a document lost between the register and central (here taken
off the ingest queue by hand) is found as a hole by the real `tillsync-central run`,
asked for with a resend request, and resent by the real agent — long before the agent's
own ack timeout would have resent it."""

from __future__ import annotations

import aio_pika
import pytest

from e2e.conftest import Central, agent_settings, running_agent, wait_for
from e2e.test_upward import assert_converged, submit_receipts
from register_ids import reg
from tillsync_agent import Agent
from tillsync_protocol import decode, topology


@pytest.fixture
def central_env() -> dict[str, str]:
    return {"TILLSYNC_RECONCILE_INTERVAL_S": "0.5", "TILLSYNC_RECONCILE_HOLE_GRACE_S": "0.5"}


def _published(agent: Agent, n: int):
    async def check() -> bool:
        return agent._sender.stats.published >= n

    return check


async def _drop_from_ingest_queue(amqp_url: str, seq: int, expected: int) -> str:
    """Take every message off ``tillsync.ingest``, drop the one with ``seq``, return the
    rest; the doc_id of the dropped one."""
    dropped = ""
    connection = await aio_pika.connect(amqp_url, timeout=15)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=0)
        queue = await channel.get_queue(topology.INGEST_QUEUE, ensure=False)
        held = []
        while len(held) < expected:
            message = await queue.get(no_ack=False, fail=False, timeout=5)
            assert message is not None, f"only {len(held)} of {expected} messages queued"
            held.append(message)
        for message in held:
            document = decode(message.body)
            if document.seq == seq:  # type: ignore[attr-defined]
                dropped = str(document.doc_id)  # type: ignore[attr-defined]
                await message.ack()
            else:
                await message.reject(requeue=True)
    assert dropped, f"seq {seq} was not in the queue"
    return dropped


async def test_a_lost_document_is_asked_for_and_resent(central: Central, tmp_path) -> None:
    enrollment = await central.provision("c-1", reg("r-hole"))
    # The agent would resend on its own only after ten minutes; one message a document, so
    # one of them can be lost alone.
    settings = agent_settings(enrollment, tmp_path, ack_timeout_s=600.0, publish_batch_max=1)
    async with running_agent(settings) as agent:
        central.kill()
        await submit_receipts(agent, 20)
        await wait_for(_published(agent, 20), timeout=30, what="20 documents confirmed")
        doc_id = await _drop_from_ingest_queue(central.amqp_url, seq=7, expected=20)
        await central.start()
        await assert_converged(central, agent, timeout=60)
        assert agent.outbox.counts.acknowledged == 20

    async def resolved() -> bool:
        return bool(
            await central.pool.fetchval(
                "SELECT count(*) FROM seq_holes WHERE resolved_at IS NOT NULL"
            )
        )

    await wait_for(resolved, timeout=10, what="the next pass to mark the hole filled")
    holes = await central.pool.fetch("SELECT from_seq, to_seq, requests FROM seq_holes")
    assert len(holes) == 1
    assert (holes[0]["from_seq"], holes[0]["to_seq"]) == (7, 7)
    assert holes[0]["requests"] >= 1
    stored = await central.pool.fetchval(
        "SELECT doc_id::text FROM documents WHERE register_id = $1 AND seq = 7",
        enrollment.register_id,
    )
    assert stored == doc_id  # the very document the register stored, resent
    assert "resend requested" in central.log_path.read_text(errors="replace")
