"""The committed RabbitMQ definitions match the library; routing-key helpers round-trip."""

from __future__ import annotations

import json

import pytest

from tillsync_protocol import DOCUMENT_TYPES, topology

from .vectors import ROOT, generator

DEFINITIONS = ROOT / "deploy" / "rabbitmq" / "definitions.json"


def test_definitions_file_equals_the_generated_document() -> None:
    text = DEFINITIONS.read_text(encoding="utf-8")
    assert json.loads(text) == topology.definitions()
    assert text == generator().definitions_text(), (
        "rerun: uv run python protocol/vectors/generate.py --write-definitions"
    )


def test_definitions_declare_every_exchange_queue_and_binding() -> None:
    document = json.loads(DEFINITIONS.read_text(encoding="utf-8"))
    exchanges = {e["name"]: e["type"] for e in document["exchanges"]}
    assert exchanges == {e.name: e.type for e in topology.exchanges()}
    queues = {q["name"]: q["arguments"] for q in document["queues"]}
    assert queues[topology.INGEST_QUEUE]["x-delivery-limit"] == topology.INGEST_DELIVERY_LIMIT
    assert queues[topology.INGEST_QUEUE]["x-dead-letter-exchange"] == topology.DEAD_LETTER_EXCHANGE
    assert queues[topology.INGEST_QUEUE]["x-overflow"] == "reject-publish"
    for binding in document["bindings"]:
        assert binding["source"] in exchanges
        assert binding["destination"] in queues
    bound = {b["destination"] for b in document["bindings"]}
    assert bound == set(queues)


def test_definitions_can_target_another_vhost() -> None:
    document = topology.definitions("tillsync-test")
    objects = [*document["exchanges"], *document["queues"], *document["bindings"]]
    assert {o["vhost"] for o in objects} == {"tillsync-test"}


@pytest.mark.parametrize("doc_type", sorted(DOCUMENT_TYPES))
def test_document_key_round_trips(doc_type: str) -> None:
    key = topology.document_key("praha-1", "praha-1-r01", doc_type)
    assert key == f"praha-1.praha-1-r01.{doc_type}"
    assert topology.parse_document_key(key) == ("praha-1", "praha-1-r01", doc_type)


@pytest.mark.parametrize(
    "key", ["", "praha-1.praha-1-r01", "a.b.c.d", "praha-1..receipt", ".r.receipt", "c.r."]
)
def test_parse_document_key_refuses_malformed_keys(key: str) -> None:
    assert topology.parse_document_key(key) is None


def test_register_names_and_keys() -> None:
    assert topology.register_username("praha-1-r01") == "reg-praha-1-r01"
    assert topology.register_queue("praha-1-r01") == "tillsync.reg.praha-1-r01"
    assert topology.register_key("praha-1-r01", "ack") == "reg.praha-1-r01.ack"
    assert topology.presence_key("praha-1", "praha-1-r01") == "hb.praha-1.praha-1-r01"
    assert topology.catalog_key("global", "items") == "cat.global.items"


def _topic_match(pattern: str, key: str) -> bool:
    """AMQP topic matching: ``*`` is one word, ``#`` zero or more."""

    def match(p: list[str], k: list[str]) -> bool:
        if not p:
            return not k
        if p[0] == "#":
            return any(match(p[1:], k[i:]) for i in range(len(k) + 1))
        return bool(k) and p[0] in ("*", k[0]) and match(p[1:], k[1:])

    return match(pattern.split("."), key.split("."))


def test_register_queue_receives_its_scopes_and_its_own_messages_only() -> None:
    bindings = topology.register_queue_bindings("praha-1-r01", "praha-1")
    assert {b.queue for b in bindings} == {topology.register_queue("praha-1-r01")}

    def routed(exchange: str, key: str) -> bool:
        return any(b.exchange == exchange and _topic_match(b.routing_key, key) for b in bindings)

    assert routed(topology.CATALOG_EXCHANGE, topology.catalog_key("global", "items"))
    assert routed(topology.CATALOG_EXCHANGE, topology.catalog_key("praha-1", "prices"))
    assert not routed(topology.CATALOG_EXCHANGE, topology.catalog_key("brno-2", "prices"))
    assert routed(topology.REGISTERS_EXCHANGE, topology.register_key("praha-1-r01", "ack"))
    assert not routed(topology.REGISTERS_EXCHANGE, topology.register_key("praha-1-r02", "ack"))


def test_shared_bindings_route_every_published_key_to_its_queue() -> None:
    routes = {
        topology.document_key("praha-1", "praha-1-r01", "receipt"): (
            topology.DOCS_EXCHANGE,
            topology.INGEST_QUEUE,
        ),
        "rpc.praha-1.praha-1-r01.delta": (topology.RPC_EXCHANGE, topology.RPC_QUEUE),
        topology.presence_key("praha-1", "praha-1-r01"): (
            topology.PRESENCE_EXCHANGE,
            topology.PRESENCE_QUEUE,
        ),
    }
    for key, (exchange, queue) in routes.items():
        assert any(
            b.exchange == exchange and b.queue == queue and _topic_match(b.routing_key, key)
            for b in topology.shared_bindings()
        ), key


def test_register_queue_is_bounded() -> None:
    arguments = topology.register_queue_arguments()
    assert arguments["x-max-length"] == topology.REGISTER_QUEUE_MAX_LENGTH
    assert arguments["x-overflow"] == "drop-head"
    assert topology.register_queue_arguments(50)["x-max-length"] == 50
