"""``document_batch`` messages through the ingest worker, against real RabbitMQ and
PostgreSQL: every document of a batch is stored, refused and acknowledged on its own,
counted at both ends."""

from __future__ import annotations

import asyncpg
import msgpack
from tills import Till, canonical, count, pack, raw_document, receipt_body, until

from conftest import Enroll, new_id
from tillsync_central.intake import Delivery, inspect_kept
from tillsync_central.runner import IngestService
from tillsync_protocol import BATCH_TYPE, encode_batch
from tillsync_protocol.topology import document_key


async def test_a_batch_is_stored_and_acked_document_by_document(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    async with Till(await enroll()) as till:
        payloads = [canonical(till.document(seq)) for seq in range(1, 8)]
        await till.publish_batch(payloads[:5])
        await till.publish_batch(payloads[5:])
        await till.wait_for(range(1, 8))
        assert till.acks.accepted == set(range(1, 8))
        assert till.acks.rejected == {}
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT seq, payload FROM documents ORDER BY seq")
        assert await conn.fetchval("SELECT count(*) FROM receipts") == 7
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 0
    # Each document keeps its own bytes (its content hash and conflicts depend on them).
    assert [bytes(r["payload"]) for r in rows] == payloads
    assert ingest.stats.documents == 7
    assert ingest.stats.deliveries == 2
    assert ingest.stats.stored == 7


async def test_a_batch_replayed_or_overlapping_is_stored_once_and_a_changed_member_conflicts(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    async with Till(await enroll()) as till:
        payloads = {seq: canonical(till.document(seq)) for seq in range(1, 5)}
        await till.publish_batch([payloads[1], payloads[2], payloads[3]])
        await till.wait_for({1, 2, 3})
        # The same batch again (a lost ack), then 2-4 regrouped as a resend would.
        await till.publish_batch([payloads[1], payloads[2], payloads[3]])
        await till.publish_batch([payloads[2], payloads[3], payloads[4]])
        impostor = canonical(till.document(3, body=receipt_body(3, total=9900)))
        await till.publish_batch([impostor, payloads[4]])

        async def settled() -> bool:
            return 3 in till.acks.rejected and till.acks.accepted_count.get(2, 0) >= 3

        await until(settled)
        assert till.acks.accepted == {1, 2, 3, 4}
        assert till.acks.rejected[3].code == "conflict"
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM documents") == 4
        assert (
            bytes(await conn.fetchval("SELECT payload FROM documents WHERE seq = 3"))
            == (payloads[3])
        )
        assert await conn.fetchval("SELECT count(*) FROM conflicts") == 1
    assert ingest.stats.duplicates >= 6


async def test_bad_documents_of_a_batch_are_dead_lettered_alone_while_the_rest_is_stored(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    async with Till(await enroll()) as till:
        wrong_type = till.document(2)
        wrong_type["body"]["total"] = "2500"
        other_center = till.document(4)
        other_center["center_id"] = new_id("c")
        control = {"v": [1, 0], "type": "heartbeat", "created_at": 1, "msg_id": "x", "body": {}}
        members = [
            canonical(till.document(1)),
            pack(wrong_type),
            canonical(till.document(3)),
            canonical(other_center),
            pack(control),  # not a document: names no seq, so only a dead letter
            canonical(till.document(5)),
        ]
        await till.publish_batch(members)
        await till.wait_for({1, 2, 3, 4, 5})
        assert till.acks.accepted == {1, 3, 5}
        got = {s: (r.code, r.field) for s, r in till.acks.rejected.items()}
        assert got == {2: ("wrong_type", "body.total"), 4: ("identity_mismatch", "center_id")}

        async def three_letters() -> bool:
            return await count(pool, "SELECT count(*) FROM dead_letters") == 3

        await until(three_letters)
    async with pool.acquire() as conn:
        letters = await conn.fetch("SELECT * FROM dead_letters ORDER BY id")
        assert await conn.fetchval("SELECT array_agg(seq ORDER BY seq) FROM documents") == [1, 3, 5]
    by_payload = {bytes(r["payload"]): r for r in letters}
    assert set(by_payload) == {members[1], members[3], members[4]}  # the members' own bytes
    assert (by_payload[members[1]]["code"], by_payload[members[1]]["seq"]) == ("wrong_type", 2)
    assert by_payload[members[3]]["code"] == "identity_mismatch"
    assert by_payload[members[4]]["code"] == "unknown_type"
    for letter in letters:
        assert letter["routing_key"] == f"{till.center_id}.{till.register_id}.{BATCH_TYPE}"
        assert letter["user_id"] == till.enrollment.broker_user


async def test_a_batch_that_does_not_split_is_one_dead_letter_and_traffic_flows_on(
    enroll: Enroll, ingest: IngestService, pool: asyncpg.Pool
) -> None:
    async with Till(await enroll()) as till:
        document = canonical(till.document(1))
        broken = {
            b"\xc1 not MessagePack": ("malformed", ""),
            msgpack.packb(["a string, not bin"]): ("wrong_type", "[0]"),
            msgpack.packb([]): ("out_of_range", ""),
            encode_batch([document]) + b"\x00": ("malformed", ""),
            document: ("malformed", ""),  # a lone document sent under the batch key
        }
        for body in broken:
            await till.publish(body, doc_type=BATCH_TYPE)
        await till.publish_batch([canonical(till.document(2)), canonical(till.document(3))])
        await till.wait_for({2, 3})

        async def all_letters() -> bool:
            return await count(pool, "SELECT count(*) FROM dead_letters") == len(broken)

        await until(all_letters)
        assert till.acks.accepted == {2, 3}
        assert till.acks.rejected == {}  # a batch that does not split names no seq
    async with pool.acquire() as conn:
        letters = await conn.fetch("SELECT * FROM dead_letters")
        assert await conn.fetchval("SELECT count(*) FROM documents") == 2
    got = {bytes(r["payload"]): (r["code"], r["field"]) for r in letters}
    assert got == broken
    assert {r["register_id"] for r in letters} == {till.register_id}


def test_kept_bytes_under_a_batch_key_replay_as_one_document_or_as_the_whole_batch() -> None:
    center, register = "c-1", "r-1"
    raws = [raw_document(center, register, seq) for seq in (1, 2, 3)]
    members = [canonical(raw) for raw in raws]

    def kept(body: bytes) -> Delivery:
        key = document_key(center, register, BATCH_TYPE)
        return Delivery(body, key, f"reg-{register}", None, {})

    [one] = inspect_kept(kept(members[1]))  # a document of a batch, dead-lettered alone
    assert (one.error, one.seq) == (None, 2)
    whole = inspect_kept(kept(encode_batch(members)))  # a batch the broker gave up on
    assert [(i.error, i.seq) for i in whole] == [(None, 1), (None, 2), (None, 3)]
    [broken] = inspect_kept(kept(b"\x93"))  # truncated
    assert broken.error is not None
    assert broken.error.code == "malformed"
