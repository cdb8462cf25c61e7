"""The ack protocol, central side: what each register is told after a batch commits.

One :class:`~tillsync_protocol.Ack` per register per batch (more only past the protocol's
10 000 ranges or rejections per message), carrying the accepted seqs as inclusive ranges
(consecutive seqs compressed) and the rejected ones with code, field and reason. It is
published to ``tillsync.registers`` with key ``reg.<register>.ack`` and lands in the
register's own queue. An ack repeats nothing harmful: the register ignores seqs it has
already settled.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import aio_pika

from tillsync_protocol import Ack, AckBody, Rejection, SeqRange, topology

from .confirms import control_message

if TYPE_CHECKING:
    from .store import BatchResult

__all__ = ["MAX_ITEMS", "ack_messages", "build_acks", "seq_ranges"]

MAX_ITEMS = 10_000
"""Most ranges, and most rejections, one ack message may carry (the protocol's limit)."""


def seq_ranges(seqs: Iterable[int]) -> list[SeqRange]:
    """Sorted inclusive ranges covering exactly ``seqs``: {1, 2, 3, 7} → [1-3, 7-7]."""
    ranges: list[SeqRange] = []
    first = last = None
    for seq in sorted(set(seqs)):
        if last is not None and seq == last + 1:
            last = seq
            continue
        if first is not None and last is not None:
            ranges.append(SeqRange(first=first, last=last))
        first = last = seq
    if first is not None and last is not None:
        ranges.append(SeqRange(first=first, last=last))
    return ranges


def build_acks(
    register_id: str, accepted: Iterable[int], rejected: Sequence[Rejection]
) -> list[Ack]:
    """The ack message(s) for one register: usually exactly one."""
    ranges = seq_ranges(accepted)
    acks: list[Ack] = []
    for start in range(0, max(len(ranges), len(rejected), 1), MAX_ITEMS):
        body = AckBody(
            register_id=register_id,
            accepted=ranges[start : start + MAX_ITEMS],
            rejected=list(rejected[start : start + MAX_ITEMS]),
        )
        now = time.time_ns() // 1_000_000
        acks.append(Ack(msg_id=str(uuid.uuid4()), created_at=now, body=body))
    return acks


def ack_messages(result: BatchResult) -> list[tuple[aio_pika.Message, str]]:
    """The acks of a committed batch as ``(message, routing key)``, registers in order.

    Transient: a persistent ack would wait for the broker's disk before its confirm, on
    every batch's path. An ack the broker loses in a restart costs nothing lasting: the
    agent resends everything open on reconnect, and the repeats are acknowledged again.
    Not mandatory either: an ack for a register without a queue is lost the same way.
    """
    messages = []
    for register_id in sorted(set(result.accepted) | set(result.rejected)):
        accepted = result.accepted.get(register_id, set())
        rejected = result.rejected.get(register_id, [])
        key = topology.register_key(register_id, "ack")
        for ack in build_acks(register_id, accepted, rejected):
            messages.append((control_message(ack, persistent=False), key))
    return messages
