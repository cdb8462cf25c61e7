"""Every name of the RabbitMQ topology, in one place.

Central declares all of it (``tillsync-central`` at start-up); registers declare nothing.
``deploy/rabbitmq/definitions.json`` is generated from :func:`definitions` and a test
checks that the file matches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .codec import CONTENT_TYPE

__all__ = [
    "CATALOG_EXCHANGE",
    "CONTENT_TYPE",
    "DEAD_LETTER_EXCHANGE",
    "DEAD_LETTER_QUEUE",
    "DOCS_EXCHANGE",
    "INGEST_DELIVERY_LIMIT",
    "INGEST_QUEUE",
    "PRESENCE_EXCHANGE",
    "PRESENCE_QUEUE",
    "REGISTERS_EXCHANGE",
    "REGISTER_QUEUE_MAX_LENGTH",
    "RPC_EXCHANGE",
    "RPC_QUEUE",
    "Binding",
    "Exchange",
    "Queue",
    "catalog_key",
    "definitions",
    "document_key",
    "exchanges",
    "parse_document_key",
    "presence_key",
    "queues",
    "register_key",
    "register_queue",
    "register_queue_arguments",
    "register_queue_bindings",
    "register_username",
    "shared_bindings",
]

DOCS_EXCHANGE = "tillsync.docs"
"""Topic exchange registers publish documents to, key ``<center>.<register>.<doc_type>``."""
INGEST_QUEUE = "tillsync.ingest"
"""Quorum queue the ingest workers compete on."""
DEAD_LETTER_EXCHANGE = "tillsync.dlx"
"""Fanout exchange for messages the ingest queue gives up on (delivery limit reached)."""
DEAD_LETTER_QUEUE = "tillsync.dead"
INGEST_DELIVERY_LIMIT = 5
"""Deliveries of one message before the broker dead-letters it (3.10 has no default)."""

CATALOG_EXCHANGE = "tillsync.catalog"
"""Topic exchange of catalog changes, key ``cat.<scope>.<entity>``."""
REGISTERS_EXCHANGE = "tillsync.registers"
"""Topic exchange of what is meant for one register, key ``reg.<register>.<kind>``."""
RPC_EXCHANGE = "tillsync.rpc"
"""Topic exchange of requests to central (delta, snapshot),
key ``rpc.<center>.<register>.<name>``."""
RPC_QUEUE = "tillsync.rpc.catalog"
PRESENCE_EXCHANGE = "tillsync.presence"
"""Topic exchange of heartbeats, key ``hb.<center>.<register>``."""
PRESENCE_QUEUE = "tillsync.presence"
REGISTER_QUEUE_MAX_LENGTH = 10_000
"""Messages a register's queue holds while it is offline; older ones are dropped and the
register recovers them by a delta request."""


@dataclass(frozen=True)
class Exchange:
    name: str
    type: str
    durable: bool = True


@dataclass(frozen=True)
class Queue:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    durable: bool = True


@dataclass(frozen=True)
class Binding:
    exchange: str
    queue: str
    routing_key: str


def register_username(register_id: str) -> str:
    """The broker user of a register; RabbitMQ checks it against every message's ``user_id``."""
    return f"reg-{register_id}"


def document_key(center_id: str, register_id: str, doc_type: str) -> str:
    return f"{center_id}.{register_id}.{doc_type}"


def parse_document_key(key: str) -> tuple[str, str, str] | None:
    """``(center, register, doc_type)`` of a document routing key, or None if malformed."""
    parts = key.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    return parts[0], parts[1], parts[2]


def catalog_key(scope: str, entity: str) -> str:
    return f"cat.{scope}.{entity}"


def register_key(register_id: str, kind: str) -> str:
    """Key of a message for one register: ``kind`` is ``ack``, ``command``, ``delta``…"""
    return f"reg.{register_id}.{kind}"


def presence_key(center_id: str, register_id: str) -> str:
    return f"hb.{center_id}.{register_id}"


def register_queue(register_id: str) -> str:
    return f"tillsync.reg.{register_id}"


def register_queue_arguments(max_length: int = REGISTER_QUEUE_MAX_LENGTH) -> dict[str, Any]:
    return {"x-queue-type": "classic", "x-max-length": max_length, "x-overflow": "drop-head"}


def register_queue_bindings(register_id: str, center_id: str) -> list[Binding]:
    """A register's queue receives global and its center's catalog, and its own messages."""
    queue = register_queue(register_id)
    return [
        Binding(CATALOG_EXCHANGE, queue, "cat.global.*"),
        Binding(CATALOG_EXCHANGE, queue, f"cat.{center_id}.*"),
        Binding(REGISTERS_EXCHANGE, queue, f"reg.{register_id}.*"),
    ]


def exchanges() -> list[Exchange]:
    return [
        Exchange(DOCS_EXCHANGE, "topic"),
        Exchange(DEAD_LETTER_EXCHANGE, "fanout"),
        Exchange(CATALOG_EXCHANGE, "topic"),
        Exchange(REGISTERS_EXCHANGE, "topic"),
        Exchange(RPC_EXCHANGE, "topic"),
        Exchange(PRESENCE_EXCHANGE, "topic"),
    ]


def queues() -> list[Queue]:
    return [
        Queue(
            INGEST_QUEUE,
            {
                "x-queue-type": "quorum",
                "x-delivery-limit": INGEST_DELIVERY_LIMIT,
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            },
        ),
        Queue(DEAD_LETTER_QUEUE, {"x-queue-type": "quorum"}),
        Queue(
            RPC_QUEUE,
            {"x-queue-type": "quorum", "x-delivery-limit": INGEST_DELIVERY_LIMIT},
        ),
        # Heartbeats are worth nothing once stale: a bounded classic queue with a TTL.
        Queue(
            PRESENCE_QUEUE,
            {"x-queue-type": "classic", "x-max-length": 100_000, "x-message-ttl": 300_000},
        ),
    ]


def shared_bindings() -> list[Binding]:
    return [
        Binding(DOCS_EXCHANGE, INGEST_QUEUE, "#"),
        Binding(DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, ""),
        Binding(RPC_EXCHANGE, RPC_QUEUE, "rpc.#"),
        Binding(PRESENCE_EXCHANGE, PRESENCE_QUEUE, "hb.#"),
    ]


def definitions(vhost: str = "/") -> dict[str, Any]:
    """The shared topology as a RabbitMQ definitions document
    (``rabbitmqctl import_definitions``)."""
    return {
        "exchanges": [
            {
                "name": e.name,
                "vhost": vhost,
                "type": e.type,
                "durable": e.durable,
                "auto_delete": False,
                "internal": False,
                "arguments": {},
            }
            for e in exchanges()
        ],
        "queues": [
            {
                "name": q.name,
                "vhost": vhost,
                "durable": q.durable,
                "auto_delete": False,
                "arguments": q.arguments,
            }
            for q in queues()
        ],
        "bindings": [
            {
                "source": b.exchange,
                "vhost": vhost,
                "destination": b.queue,
                "destination_type": "queue",
                "routing_key": b.routing_key,
                "arguments": {},
            }
            for b in shared_bindings()
        ],
    }
