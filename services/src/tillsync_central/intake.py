"""Checking one delivery before it may be stored: who sent it, where to, and what it is.

The checks, in order (the first failure is the verdict):

1. ``user_id`` is set (RabbitMQ validates it only when it is): else ``missing_user_id``;
2. the routing key is ``<center>.<register>.<doc_type>``: else ``invalid_routing_key``;
3. the bytes are a valid v1 document (:func:`tillsync_protocol.decode_document`): else the
   :class:`~tillsync_protocol.ProtocolError`'s code and field;
4. ``user_id`` is ``reg-<body.register_id>`` and the routing key's center, register and
   type are the body's: else ``identity_mismatch``, with the body field that disagrees;
5. the register is known, not revoked and in the body's center: else ``unknown_register``.

A ``document_batch`` (routing key ``<center>.<register>.document_batch``) is first split
into its documents (:func:`tillsync_protocol.split_batch`; a batch that does not split is
refused whole with that error), then each document goes through steps 3-5 with the
batch's ``user_id`` and routing key, step 4 comparing only center and register
(:func:`inspect_message`).

Steps 1-4 need nothing but the delivery (:func:`inspect`); step 5 needs the registers
table (:func:`check_register`). A refusal is sent back to a register only when the
broker vouched for it: its ``user_id`` names a known, active register
(:func:`attribute`). The body never decides who gets a rejection.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import msgpack

from tillsync_protocol import (
    BATCH_TYPE,
    Document,
    ProtocolError,
    RejectedError,
    TillsyncError,
    decode_document,
    split_batch,
    topology,
)

__all__ = [
    "Delivery",
    "Inspection",
    "RegisterRow",
    "attribute",
    "check_register",
    "inspect",
    "inspect_kept",
    "inspect_message",
    "register_of_user",
]

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_REGISTER_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_MAX_SEQ = 2**63 - 1


@dataclass(frozen=True)
class Delivery:
    """What ingest keeps of one AMQP delivery (``headers`` already JSON-safe)."""

    body: bytes
    routing_key: str
    user_id: str | None
    message_id: str | None
    headers: dict[str, Any]


@dataclass(frozen=True)
class RegisterRow:
    register_id: str
    center_id: str
    revoked_at: datetime | None


@dataclass(frozen=True)
class Inspection:
    """A delivery after the checks that need no database.

    ``document`` is set when the bytes decoded; ``error`` when a check failed.
    ``register_id``, ``seq`` and ``doc_id`` are what the message *claims* (from the body,
    read leniently when it does not decode), for dead letters and rejections.
    """

    delivery: Delivery
    document: Document | None
    error: TillsyncError | None
    register_id: str | None
    seq: int | None
    doc_id: str | None


def register_of_user(user_id: str | None) -> str | None:
    """The register a broker user ``reg-<id>`` stands for, or None."""
    if user_id is None or not user_id.startswith("reg-"):
        return None
    register_id = user_id[4:]
    return register_id if _REGISTER_ID.match(register_id) else None


def inspect_message(delivery: Delivery) -> list[Inspection]:
    """A document's inspection, or one per document of a ``document_batch``: each
    document of a batch is checked, stored, refused and acknowledged on its own, with the
    batch's routing key and ``user_id``. A batch that does not split is one refusal."""
    key = topology.parse_document_key(delivery.routing_key)
    if key is None or key[2] != BATCH_TYPE or not delivery.user_id:
        return [inspect(delivery)]
    try:
        members = split_batch(delivery.body)
    except ProtocolError as exc:
        return [Inspection(delivery, None, exc, key[1], None, None)]
    return [inspect(replace(delivery, body=member), batched=True) for member in members]


def inspect_kept(delivery: Delivery) -> list[Inspection]:
    """:func:`inspect_message` for bytes kept as a dead letter (a replay). Under a batch's
    routing key ingest keeps either one document of the batch (a MessagePack map) or the
    whole body (an array: a batch that did not split, or one the broker gave up on)."""
    key = topology.parse_document_key(delivery.routing_key)
    if key is not None and key[2] == BATCH_TYPE and _is_map(delivery.body):
        return [inspect(delivery, batched=True)]
    return inspect_message(delivery)


def _is_map(body: bytes) -> bool:
    """Whether MessagePack ``body`` starts with a map (fixmap, map 16 or map 32)."""
    return bool(body) and (0x80 <= body[0] <= 0x8F or body[0] in (0xDE, 0xDF))


def inspect(delivery: Delivery, *, batched: bool = False) -> Inspection:
    """Run the checks that need only the delivery itself (steps 1-4); ``batched`` for a
    document of a batch, whose routing key names no document type."""
    document: Document | None = None
    error: TillsyncError | None = None
    key = topology.parse_document_key(delivery.routing_key)
    if not delivery.user_id:
        error = RejectedError(
            "the message has no user_id: RabbitMQ vouches for the sender only when it is set",
            field="user_id",
            code="missing_user_id",
        )
    elif key is None:
        error = RejectedError(
            f"routing key {delivery.routing_key!r} is not <center>.<register>.<doc_type>",
            field="routing_key",
            code="invalid_routing_key",
        )
    else:
        try:
            document = decode_document(delivery.body)
        except ProtocolError as exc:
            error = exc
    if document is not None and key is not None:
        error = _identity_error(document, key, delivery.user_id, batched)
    if document is not None:
        return Inspection(
            delivery, document, error, document.register_id, document.seq, document.doc_id
        )
    register_id, seq, doc_id = _claims(delivery.body)
    if register_id is None and key is not None:
        register_id = key[1]
    return Inspection(delivery, None, error, register_id, seq, doc_id)


def _identity_error(
    document: Document, key: tuple[str, str, str], user_id: str | None, batched: bool
) -> TillsyncError | None:
    center, register, doc_type = key
    if batched:
        doc_type = document.type
    if user_id != topology.register_username(document.register_id):
        return RejectedError(
            f"user_id {user_id!r} may not send documents of register {document.register_id!r}",
            field="register_id",
            code="identity_mismatch",
        )
    for field, routed, claimed in (
        ("center_id", center, document.center_id),
        ("register_id", register, document.register_id),
        ("type", doc_type, document.type),
    ):
        if routed != claimed:
            return RejectedError(
                f"the routing key says {routed!r}, the document's {field} says {claimed!r}",
                field=field,
                code="identity_mismatch",
            )
    return None


def check_register(
    inspection: Inspection, registers: Mapping[str, RegisterRow]
) -> TillsyncError | None:
    """Step 5, for a document that passed steps 1-4: its register may send."""
    document = inspection.document
    if document is None or inspection.error is not None:
        return inspection.error
    row = registers.get(document.register_id)
    if row is None or row.revoked_at is not None:
        state = "unknown" if row is None else "revoked"
        return RejectedError(
            f"register {document.register_id!r} is {state}",
            field="register_id",
            code="unknown_register",
        )
    if row.center_id != document.center_id:
        return RejectedError(
            f"register {document.register_id!r} belongs to center {row.center_id!r}, "
            f"not {document.center_id!r}",
            field="center_id",
            code="unknown_register",
        )
    return None


def attribute(inspection: Inspection, registers: Mapping[str, RegisterRow]) -> str | None:
    """The register a refusal goes back to: the one the broker vouched for (its
    ``user_id``), if known and active, and only when the refusal can name a seq."""
    register_id = register_of_user(inspection.delivery.user_id)
    if register_id is None or inspection.seq is None:
        return None
    row = registers.get(register_id)
    if row is None or row.revoked_at is not None:
        return None
    return register_id


def _claims(body: bytes) -> tuple[str | None, int | None, str | None]:
    """``register_id``, ``seq`` and ``doc_id`` of a message that did not decode, when its
    top level is still a readable map; anything unusable is None."""
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=False)
    except Exception:  # not MessagePack at all: it claims nothing
        return None, None, None
    if not isinstance(raw, dict):
        return None, None, None
    register_id = raw.get("register_id")
    seq = raw.get("seq")
    doc_id = raw.get("doc_id")
    return (
        register_id if isinstance(register_id, str) and _REGISTER_ID.match(register_id) else None,
        seq if type(seq) is int and 1 <= seq <= _MAX_SEQ else None,
        doc_id if isinstance(doc_id, str) and _UUID.match(doc_id) else None,
    )
