"""The ingest worker against real RabbitMQ and PostgreSQL: what is stored, what is acked,
what is refused, counted at both ends."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import asyncpg
import pytest
from tills import (
    Till,
    canonical,
    count,
    documents_rows_read,
    pack,
    raw_document,
    receipt_body,
    store_seqs,
    until,
)

from conftest import Enroll, new_id
from tillsync_central.ingest import StateAdvancer
from tillsync_central.management import Management
from tillsync_central.runner import IngestService
from tillsync_central.settings import CentralSettings
from tillsync_central.store import ADVANCE_STATE
from tillsync_protocol import topology


async def _admin_publish(
    settings: CentralSettings,
    payload: bytes,
    routing_key: str,
    *,
    user_id: str | None = None,
    message_id: str | None = None,
) -> None:
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
        message = aio_pika.Message(
            payload,
            content_type=topology.CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            user_id=user_id,
            message_id=message_id,
        )
        await exchange.publish(message, routing_key, timeout=10)


def _shift_close(first: int, last: int, receipts: int, total: int) -> dict[str, Any]:
    return {
        "shift_no": 1,
        "z_number": 1,
        "employee_id": "emp-1",
        "currency": "CZK",
        "first_seq": first,
        "last_seq": last,
        "receipt_count": receipts,
        "refund_count": 0,
        "void_count": 0,
        "gross_sales": total,
        "refunds_total": 0,
        "net_total": total,
        "payments": [{"method_id": "cash", "count": receipts, "amount": total}],
        "taxes": [],
        "cash_expected": total,
        "cash_counted": total,
    }


async def test_documents_of_two_registers_are_stored_once_and_acked_to_each(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    center = new_id("c")
    tills = [Till(await enroll(center)), Till(await enroll(center))]
    receipts = 48
    for till in tills:
        async with till:
            shift = till.document(
                1,
                "shift_open",
                {"shift_no": 1, "employee_id": "emp-1", "currency": "CZK", "opening_float": 500},
            )
            docs = [shift] + [till.document(seq) for seq in range(2, receipts + 2)]
            last = receipts + 2
            docs.append(
                till.document(
                    last, "shift_close", _shift_close(2, last - 1, receipts, receipts * 2500)
                )
            )
            payloads = await till.publish_documents(docs)
            acks = await till.wait_for(range(1, last + 1))
            assert acks.accepted == set(range(1, last + 1))
            assert acks.rejected == {}
            async with pool.acquire() as conn:
                stored = await conn.fetch(
                    "SELECT seq, payload, content_hash FROM documents"
                    " WHERE register_id = $1 ORDER BY seq",
                    till.register_id,
                )
                assert [r["seq"] for r in stored] == list(range(1, last + 1))
                assert [bytes(r["payload"]) for r in stored] == payloads
                assert all(
                    bytes(r["content_hash"]) == hashlib.sha256(bytes(r["payload"])).digest()
                    for r in stored
                )
                assert (
                    await conn.fetchval(
                        "SELECT count(*) FROM receipts WHERE register_id = $1", till.register_id
                    )
                    == receipts
                )
                shift_row = await conn.fetchrow(
                    "SELECT * FROM shifts WHERE register_id = $1 AND shift_no = 1", till.register_id
                )
                assert shift_row["opened_seq"] == 1
                assert shift_row["opening_float"] == 500
                assert shift_row["closed_seq"] == last
                assert shift_row["net_total"] == receipts * 2500
                assert shift_row["payments"] == [
                    {"method_id": "cash", "count": receipts, "amount": receipts * 2500}
                ]

                # Moved on right after the acks are published: a moment after they arrive.
                async def state_caught_up(
                    register_id: str = till.register_id, last: int = last
                ) -> bool:
                    state = await conn.fetchrow(
                        "SELECT * FROM register_state WHERE register_id = $1", register_id
                    )
                    return state is not None and (
                        state["contiguous_seq"],
                        state["last_seq"],
                    ) == (last, last)

                await until(state_caught_up, timeout=10)
    assert await count(pool, "SELECT count(*) FROM documents") == 2 * (receipts + 2)
    assert await count(pool, "SELECT count(*) FROM dead_letters") == 0
    assert ingest.stats.stored == 2 * (receipts + 2)


async def test_the_same_bytes_twice_are_stored_once_and_acked_twice(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    async with Till(await enroll()) as till:
        docs = [till.document(seq) for seq in (1, 2, 3)]
        payloads = await till.publish_documents(docs)
        await till.wait_for({1, 2, 3})
        # Again after the ack (a lost ack), and twice more back to back (same batch).
        for payload, doc in zip(payloads, docs, strict=True):
            await till.publish(payload, message_id=doc["doc_id"])
        await till.publish(payloads[0], message_id=docs[0]["doc_id"])

        async def acked_again() -> bool:
            return (
                till.acks.accepted_count.get(2, 0) >= 2 and till.acks.accepted_count.get(1, 0) >= 3
            )

        await until(acked_again)
        assert till.acks.rejected == {}
    assert await count(pool, "SELECT count(*) FROM documents") == 3
    assert await count(pool, "SELECT count(*) FROM conflicts") == 0
    assert ingest.stats.duplicates >= 4


async def test_same_key_different_content_is_a_conflict_and_the_original_is_kept(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    async with Till(await enroll()) as till:
        original = till.document(1)
        [original_bytes] = await till.publish_documents([original])
        await till.wait_for({1})
        impostor = till.document(1, body=receipt_body(1, total=9900))
        [impostor_bytes] = await till.publish_documents([impostor])
        await until(lambda: _has_rejection(till, 1))
        rejection = till.acks.rejected[1]
        assert rejection.code == "conflict"
        assert rejection.doc_id == impostor["doc_id"]
        # The same impostor again: still one conflict row.
        await till.publish(impostor_bytes, message_id=impostor["doc_id"])
        await until(lambda: _acks_at_least(till, 3))
    async with pool.acquire() as conn:
        stored = await conn.fetchrow("SELECT payload, doc_id::text FROM documents WHERE seq = 1")
        assert bytes(stored["payload"]) == original_bytes
        assert stored["doc_id"] == original["doc_id"]
        conflict = await conn.fetch("SELECT * FROM conflicts")
        assert len(conflict) == 1
        assert conflict[0]["kind"] == "content"
        assert bytes(conflict[0]["incoming_payload"]) == impostor_bytes
        assert bytes(conflict[0]["existing_hash"]) == hashlib.sha256(original_bytes).digest()
        assert await conn.fetchval("SELECT total FROM receipts WHERE seq = 1") == 2500


async def test_a_reused_doc_id_under_another_seq_is_a_conflict(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    async with Till(await enroll()) as till:
        first = till.document(1)
        await till.publish_documents([first])
        await till.wait_for({1})
        second = till.document(2)
        second["doc_id"] = first["doc_id"]
        await till.publish_documents([second, till.document(3)])
        await till.wait_for({2, 3})
        assert till.acks.rejected[2].code == "conflict"
        assert till.acks.rejected[2].field == "doc_id"
        assert 3 in till.acks.accepted
    assert await count(pool, "SELECT count(*) FROM conflicts WHERE kind = 'doc_id'") == 1
    assert await count(pool, "SELECT count(*) FROM documents") == 2


async def _has_rejection(till: Till, seq: int) -> bool:
    return seq in till.acks.rejected


async def _acks_at_least(till: Till, messages: int) -> bool:
    return till.acks.messages >= messages


def _break(raw: dict[str, Any], kind: str) -> tuple[bytes, str, str]:
    """Bytes of ``raw`` broken as ``kind``; the code and field ingest must report."""
    raw = copy.deepcopy(raw)
    if kind == "malformed":
        return b"\xc1 this is not MessagePack", "malformed", ""
    if kind == "wrong_type":
        raw["body"]["total"] = "2500"
        return pack(raw), "wrong_type", "body.total"
    if kind == "missing_field":
        del raw["body"]["total"]
        return pack(raw), "missing_field", "body.total"
    if kind == "float_not_allowed":
        raw["body"]["lines"][0]["unit_price"] = 25.0
        return pack(raw), "float_not_allowed", "body.lines[0].unit_price"
    if kind == "unknown_type":
        raw["type"] = "lottery_ticket"
        return pack(raw), "unknown_type", "type"
    if kind == "unsupported_version":
        raw["v"] = [2, 0]
        return pack(raw), "unsupported_version", "v"
    raise AssertionError(kind)


BAD_KINDS = [
    "malformed",
    "wrong_type",
    "missing_field",
    "float_not_allowed",
    "unknown_type",
    "unsupported_version",
]


async def test_invalid_documents_are_dead_lettered_and_rejected_while_valid_ones_flow(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    async with Till(await enroll()) as till:
        expected: dict[int, tuple[bytes, str, str]] = {}
        valid_seqs: list[int] = []
        seq = 0
        for kind in BAD_KINDS:  # each bad one between two valid ones, all in one burst
            seq += 1
            valid_seqs.append(seq)
            await till.publish_documents([till.document(seq)])
            seq += 1
            payload, code, field = _break(till.document(seq), kind)
            routing_type = "lottery_ticket" if kind == "unknown_type" else "receipt"
            await till.publish(payload, doc_type=routing_type)
            expected[seq] = (payload, code, field)
        seq += 1
        valid_seqs.append(seq)
        await till.publish_documents([till.document(seq)])

        attributable = {s for s, (_, code, _) in expected.items() if code != "malformed"}
        await till.wait_for(set(valid_seqs) | attributable)
        assert till.acks.accepted == set(valid_seqs)
        for s in attributable:
            assert (till.acks.rejected[s].code, till.acks.rejected[s].field) == expected[s][1:]

        async def all_dead_lettered() -> bool:
            return await count(pool, "SELECT count(*) FROM dead_letters") == len(expected)

        await until(all_dead_lettered)
        async with pool.acquire() as conn:
            letters = await conn.fetch("SELECT * FROM dead_letters ORDER BY id")
            stored = await conn.fetch("SELECT seq FROM documents ORDER BY seq")
        assert [r["seq"] for r in stored] == valid_seqs
        by_payload = {bytes(r["payload"]): r for r in letters}
        for payload, code, field in expected.values():
            letter = by_payload[payload]
            assert (letter["code"], letter["field"]) == (code, field)
            assert letter["source"] == "ingest"
            assert letter["user_id"] == till.enrollment.broker_user
            assert letter["routing_key"].startswith(f"{till.center_id}.{till.register_id}.")
            assert letter["reason"]
        assert set(till.acks.rejected) == attributable  # malformed bytes name no seq


async def test_a_document_without_user_id_is_refused_and_not_acked_to_anyone(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool, settings: CentralSettings
) -> None:
    async with Till(await enroll()) as till:
        forged = till.document(1)
        payload = canonical(forged)
        key = topology.document_key(till.center_id, till.register_id, "receipt")
        await _admin_publish(settings, payload, key, message_id=forged["doc_id"])
        await till.publish_documents([till.document(2)])
        await till.wait_for({2})

        async def dead_lettered() -> bool:
            return await count(pool, "SELECT count(*) FROM dead_letters") == 1

        await until(dead_lettered)
        assert 1 not in till.acks.accepted
        assert 1 not in till.acks.rejected
    async with pool.acquire() as conn:
        letter = await conn.fetchrow("SELECT * FROM dead_letters")
        assert await conn.fetchval("SELECT array_agg(seq) FROM documents") == [2]
    assert (letter["code"], letter["field"]) == ("missing_user_id", "user_id")
    assert bytes(letter["payload"]) == payload
    assert letter["user_id"] is None
    assert letter["message_id"] == forged["doc_id"]
    assert (letter["register_id"], letter["seq"]) == (till.register_id, 1)


async def test_identity_mismatches_are_refused_and_rejected_only_to_the_sender(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool, settings: CentralSettings
) -> None:
    center = new_id("c")
    async with Till(await enroll(center)) as sender, Till(await enroll(center)) as victim:
        # 1: the sender's user_id and key, the victim's register_id in the body.
        claims_victim = sender.document(1)
        claims_victim["register_id"] = victim.register_id
        await sender.publish(canonical(claims_victim))
        # 2: the routing key says refund, the body is a receipt.
        await sender.publish(canonical(sender.document(2)), doc_type="refund")
        # 3: the body names another center.
        other_center = sender.document(3)
        other_center["center_id"] = new_id("c")
        await sender.publish(canonical(other_center))
        # 4: central's own admin user, with the victim's key and body: no register vouched.
        admin_forged = victim.document(4)
        await _admin_publish(
            settings,
            canonical(admin_forged),
            topology.document_key(center, victim.register_id, "receipt"),
            user_id="tillsync",
        )
        await sender.publish_documents([sender.document(5)])

        await sender.wait_for({1, 2, 3, 5})
        assert sender.acks.accepted == {5}
        got = {s: (r.code, r.field) for s, r in sender.acks.rejected.items()}
        assert got == {
            1: ("identity_mismatch", "register_id"),
            2: ("identity_mismatch", "type"),
            3: ("identity_mismatch", "center_id"),
        }

        async def four_letters() -> bool:
            return await count(pool, "SELECT count(*) FROM dead_letters") == 4

        await until(four_letters)
        assert victim.acks.messages == 0  # never attributed by what the body claims
    async with pool.acquire() as conn:
        codes = await conn.fetch("SELECT code, field, user_id FROM dead_letters ORDER BY id")
        assert await conn.fetchval("SELECT count(*) FROM documents") == 1
    assert {(r["code"], r["field"], r["user_id"]) for r in codes} == {
        ("identity_mismatch", "register_id", sender.enrollment.broker_user),
        ("identity_mismatch", "type", sender.enrollment.broker_user),
        ("identity_mismatch", "center_id", sender.enrollment.broker_user),
        ("identity_mismatch", "register_id", "tillsync"),
    }


async def test_unknown_revoked_and_moved_registers_are_refused(
    enroll: Enroll,
    ingest: IngestService,
    pool: asyncpg.Pool,
    settings: CentralSettings,
    management: Management,
) -> None:
    moved = await enroll()
    revoked = await enroll()
    ghost_id = new_id("r")
    ghost_user = topology.register_username(ghost_id)
    await management.put_user(ghost_user, "ghost-password")
    try:
        await management.set_permissions(ghost_user, configure="^$", write=".*", read="^$")
        async with pool.acquire() as conn:
            new_center = new_id("c")
            await conn.execute("INSERT INTO centers (center_id, name) VALUES ($1, $1)", new_center)
            await conn.execute(
                "UPDATE registers SET center_id = $2 WHERE register_id = $1",
                moved.register_id,
                new_center,
            )
            await conn.execute(
                "UPDATE registers SET revoked_at = now() WHERE register_id = $1",
                revoked.register_id,
            )
        async with Till(moved) as moved_till, Till(revoked) as revoked_till:
            await moved_till.publish_documents([moved_till.document(1)])
            await revoked_till.publish_documents([revoked_till.document(1)])
            ghost_url = settings.amqp_url.get_secret_value().replace(
                "tillsync:tillsync@", f"{ghost_user}:ghost-password@"
            )
            ghost_doc = raw_document(moved.center_id, ghost_id, 1)
            connection = await aio_pika.connect(ghost_url)
            async with connection:
                channel = await connection.channel(publisher_confirms=True)
                exchange = await channel.get_exchange(topology.DOCS_EXCHANGE, ensure=False)
                await exchange.publish(
                    aio_pika.Message(canonical(ghost_doc), user_id=ghost_user),
                    topology.document_key(moved.center_id, ghost_id, "receipt"),
                    timeout=10,
                )
            # The moved register is still known and active: it is told why.
            await moved_till.wait_for({1})

        async def three_letters() -> bool:
            return await count(pool, "SELECT count(*) FROM dead_letters") == 3

        await until(three_letters)
    finally:
        await management.delete_user(ghost_user)
    assert moved_till.acks.rejected[1].code == "unknown_register"
    assert moved_till.acks.rejected[1].field == "center_id"
    assert revoked_till.acks.messages == 0  # revoked: nobody to tell
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT register_id, code, field FROM dead_letters")
        assert await conn.fetchval("SELECT count(*) FROM documents") == 0
    assert {(r["register_id"], r["code"], r["field"]) for r in rows} == {
        (moved.register_id, "unknown_register", "center_id"),
        (revoked.register_id, "unknown_register", "register_id"),
        (ghost_id, "unknown_register", "register_id"),
    }


async def test_a_message_the_broker_gives_up_on_becomes_a_delivery_limit_dead_letter(
    enroll: Enroll, settings: CentralSettings, pool: asyncpg.Pool, declared: None
) -> None:
    async with Till(await enroll()) as till:
        poison = till.document(1)
        [payload] = await till.publish_documents([poison])
    # A consumer that fails on it every time, as a crashing worker would.
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.INGEST_QUEUE, ensure=False)
        for _ in range(topology.INGEST_DELIVERY_LIMIT + 1):
            message = await queue.get(timeout=10, fail=False)
            if message is None:
                break
            await message.nack(requeue=True)
    service = IngestService(settings, pool, workers=1)
    stopping = asyncio.Event()
    task = asyncio.create_task(service.run(stopping))
    try:

        async def kept() -> bool:
            return await count(pool, "SELECT count(*) FROM dead_letters") == 1

        await until(kept)
    finally:
        stopping.set()
        await asyncio.wait_for(task, timeout=30)
    async with pool.acquire() as conn:
        letter = await conn.fetchrow("SELECT * FROM dead_letters")
        assert await conn.fetchval("SELECT count(*) FROM documents") == 0
    assert letter["source"] == "dlx"
    assert letter["code"] == "delivery_limit"
    assert bytes(letter["payload"]) == payload
    assert (letter["register_id"], letter["seq"]) == (till.register_id, 1)
    assert letter["message_id"] == poison["doc_id"]
    assert "delivery_limit" in letter["reason"]


@pytest.mark.parametrize("size", [1, 3])
async def test_ack_ranges_compress_consecutive_seqs(size: int) -> None:
    from tillsync_central.acks import build_acks, seq_ranges

    seqs = [1, 2, 3, 7, 9, 10][: size * 2]
    ranges = [(r.first, r.last) for r in seq_ranges(seqs)]
    expanded = {s for first, last in ranges for s in range(first, last + 1)}
    assert expanded == set(seqs)
    assert all(b[0] > a[1] + 1 for a, b in itertools.pairwise(ranges))
    [ack] = build_acks("r-1", seqs, [])
    assert ack.body.register_id == "r-1"
    assert uuid.UUID(ack.msg_id)


async def test_a_document_postgresql_refuses_is_dead_lettered_without_blocking_its_batch(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    # A NUL character is a valid protocol string but PostgreSQL text cannot hold it: the
    # batch fails, is applied one document at a time, and only that one is refused.
    async with Till(await enroll()) as till:
        nul = receipt_body(2)
        nul["receipt_no"] = "R\x00-2"
        raws = [till.document(1), till.document(2, body=nul), till.document(3)]
        payloads = await till.publish_documents(raws)
        await till.wait_for({1, 2, 3})
        assert till.acks.accepted == {1, 3}
        assert till.acks.rejected[2].code == "store_failed"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT array_agg(seq ORDER BY seq) FROM documents") == [1, 3]
        letter = await conn.fetchrow("SELECT * FROM dead_letters")
    assert letter["code"] == "store_failed"
    assert bytes(letter["payload"]) == payloads[1]
    assert letter["reason"].startswith("PostgreSQL refused the document")


async def test_the_largest_shift_number_the_protocol_allows_is_stored(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    async with Till(await enroll()) as till:
        body = receipt_body(1)
        body["shift_no"] = 2**31
        await till.publish_documents([till.document(1, body=body)])
        await till.wait_for({1})
        assert till.acks.accepted == {1}
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT shift_no FROM receipts") == 2**31


@contextlib.asynccontextmanager
async def _state_row_locked(pool: asyncpg.Pool, register_id: str) -> AsyncIterator[None]:
    """Holds the register's ``register_state`` row for the block: a
    :class:`StateAdvancer`'s upsert of it waits until the block ends."""
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute(
            "SELECT 1 FROM register_state WHERE register_id = $1 FOR UPDATE", register_id
        )
        yield


async def test_register_state_writes_merge_while_one_waits(
    settings: CentralSettings, pool: asyncpg.Pool, enroll: Enroll
) -> None:
    """Batches noted while a write of ``register_state`` waits are written together by
    the next one, with the greatest seq per register, and none is lost on flush."""
    register_id = (await enroll()).register_id
    other_id = (await enroll()).register_id
    advancer = StateAdvancer(settings)
    async with _state_row_locked(pool, register_id):
        advancer.note({register_id: 3})

        async def waiting() -> bool:
            return bool(
                await count(
                    pool,
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE wait_event_type = 'Lock' AND datname = current_database()",
                )
            )

        await until(waiting, timeout=10)
        advancer.note({register_id: 9, other_id: 4})
        advancer.note({register_id: 5})
    await asyncio.wait_for(advancer.close(), timeout=10)
    assert advancer.writes == 2
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT register_id, last_seq FROM register_state WHERE register_id = ANY($1)",
            [register_id, other_id],
        )
    assert {r["register_id"]: r["last_seq"] for r in rows} == {register_id: 9, other_id: 4}


async def test_register_state_writer_opens_a_new_connection_after_losing_its_own(
    settings: CentralSettings, pool: asyncpg.Pool, enroll: Enroll
) -> None:
    register_id = (await enroll()).register_id
    advancer = StateAdvancer(settings)

    async def last_seq_is(seq: int) -> bool:
        value = await pool.fetchval(
            "SELECT last_seq FROM register_state WHERE register_id = $1", register_id
        )
        return bool(value == seq)

    try:
        advancer.note({register_id: 2})
        await until(lambda: last_seq_is(2), timeout=10)
        cut = await pool.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = $1",
            "tillsync-central register_state",
        )
        assert cut == 1
        advancer.note({register_id: 3})  # on the dead connection (logged) or a new one
        await asyncio.sleep(0.5)
        advancer.note({register_id: 4})
        await until(lambda: last_seq_is(4), timeout=10)
    finally:
        await asyncio.wait_for(advancer.close(), timeout=10)
    assert advancer.writes == 3


async def test_register_state_writer_gives_up_a_blocked_write_on_stop(
    settings: CentralSettings, pool: asyncpg.Pool, enroll: Enroll
) -> None:
    register_id = (await enroll()).register_id
    advancer = StateAdvancer(settings)
    async with _state_row_locked(pool, register_id):
        advancer.note({register_id: 7})
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(advancer.close(timeout=0.5), timeout=10)
        assert asyncio.get_running_loop().time() - started < 5
    # Given up, not written later behind the stop's back; the writer's session is gone.
    await asyncio.sleep(0.3)
    assert (
        await pool.fetchval(
            "SELECT last_seq FROM register_state WHERE register_id = $1", register_id
        )
        == 0
    )
    sessions = await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
        " AND datname = current_database()",
        "tillsync-central register_state",
    )
    assert sessions == 0


async def _advance_counting_reads(
    pool: asyncpg.Pool, register_id: str, last_seq: int
) -> tuple[int, int, int]:
    """Run ADVANCE_STATE for one register under EXPLAIN ANALYZE: the documents rows its
    plan read, then the row's ``contiguous_seq`` and ``last_seq``."""
    async with pool.acquire() as conn:
        plan = await conn.fetchval(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {ADVANCE_STATE}", [register_id], [last_seq]
        )
        if isinstance(plan, str):  # the pool decodes json columns; a bare connection not
            plan = json.loads(plan)
        state = await conn.fetchrow(
            "SELECT contiguous_seq, last_seq FROM register_state WHERE register_id = $1",
            register_id,
        )
    return documents_rows_read(plan), state["contiguous_seq"], state["last_seq"]


async def test_register_state_reads_the_new_run_not_the_registers_history(
    pool: asyncpg.Pool, enroll: Enroll
) -> None:
    """Moving ``contiguous_seq`` on reads the seqs stored since the last write, however
    many documents the register has: the statement runs after every batch."""
    enrollment = await enroll()
    register_id, center_id = enrollment.register_id, enrollment.center_id
    await store_seqs(pool, register_id, center_id, range(1, 3001))
    # Statistics, as autovacuum keeps them: a table the planner believes empty is scanned.
    await pool.execute("ANALYZE documents")
    _, contiguous, last = await _advance_counting_reads(pool, register_id, 3000)
    assert (contiguous, last) == (3000, 3000)

    # Ten more, a hole at 3011, nine after it: contiguous stops before the hole.
    await store_seqs(pool, register_id, center_id, range(3001, 3011))
    await store_seqs(pool, register_id, center_id, range(3012, 3021))
    read, contiguous, last = await _advance_counting_reads(pool, register_id, 3020)
    assert (contiguous, last) == (3010, 3020)
    assert read <= 2 * 11  # the run's ten and the missing 3011, once per use of the run

    # Behind the hole, nothing more is read, whatever comes after it.
    await store_seqs(pool, register_id, center_id, range(3021, 3031))
    read, contiguous, last = await _advance_counting_reads(pool, register_id, 3030)
    assert (contiguous, last) == (3010, 3030)
    assert read == 0

    # The hole filled: the run goes on through everything stored after it.
    await store_seqs(pool, register_id, center_id, range(3011, 3012))
    read, contiguous, last = await _advance_counting_reads(pool, register_id, 3011)
    assert (contiguous, last) == (3030, 3030)
    assert read <= 2 * 21
