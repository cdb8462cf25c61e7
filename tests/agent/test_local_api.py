"""The local HTTP API, served by a real agent in-process on a random port, over real SQLite
and a real broker (central's side is the test responder of :mod:`catalog_responder`).
Every answer is checked against the OpenAPI document the agent serves."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.routing import Route

from faults.proxy import FaultProxy
from tillsync_agent import Agent, load_settings
from tillsync_agent.event_stream import EventQueue, event_stream
from tillsync_agent.openapi import OPENAPI

from .catalog import item_state
from .catalog_responder import CENTER, REGISTER, fake_central
from .documents import receipt
from .openapi_check import check_response

TOKEN = "test-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


class Api:
    """An httpx client on the agent's API that checks every JSON answer against the
    OpenAPI document and remembers which operations were exercised."""

    def __init__(self, client: httpx.AsyncClient, agent: Agent) -> None:
        self.client = client
        self.agent = agent
        self.seen: set[tuple[str, str]] = set()

    async def call(
        self,
        method: str,
        path: str,
        expect: int,
        *,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> Any:
        response = await self.client.request(method, path, headers=headers or AUTH, **kwargs)
        assert response.status_code == expect, (method, path, response.text)
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        template = check_response(method, response.request.url.path, expect, body)
        self.seen.add((method.lower(), template))
        return body


@contextlib.asynccontextmanager
async def served(amqp_url: str, data_dir: Path, **overrides: Any) -> AsyncIterator[Api]:
    port = free_port()
    values: dict[str, Any] = {
        "register_id": REGISTER,
        "center_id": CENTER,
        "amqp_url": amqp_url,
        "data_dir": data_dir,
        "publish_timeout_s": 5.0,
        "ack_timeout_s": 2.0,
        "retry_base_s": 0.2,
        "retry_cap_s": 1.0,
        "reconnect_base_s": 0.2,
        "reconnect_cap_s": 1.0,
        "delta_timeout_s": 3.0,
        "api_port": port,
        "api_token": TOKEN,
    }
    values.update(overrides)
    async with Agent(load_settings(None, **values)) as agent:
        task = asyncio.create_task(agent.run())
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                api = Api(client, agent)

                async def up() -> bool:
                    try:
                        await client.get("/v1/openapi.json")
                    except httpx.TransportError:
                        return False
                    return agent.link.state.connected

                await wait_for(up, "the API and the link")
                yield api
        finally:
            agent.stop()
            await asyncio.wait_for(task, timeout=30)


async def synced(api: Api, expected: dict[str, int]) -> bool:
    agent = api.agent
    return await agent.replica.cursors() == expected and agent.catalog_sync.running is None


async def test_requests_without_the_token_are_refused(fresh_vhost: str, tmp_path: Path) -> None:
    async with fake_central(fresh_vhost), served(fresh_vhost, tmp_path) as api:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            response = await api.client.get("/v1/status", headers=headers)
            assert response.status_code == 401
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert response.json()["error"]["code"] == "unauthorized"
            check_response("GET", "/v1/status", 401, response.json())
        response = await api.client.post("/v1/documents", json={"type": "receipt", "body": {}})
        assert response.status_code == 401
        assert api.agent.outbox.counts.last_seq == 0
        # The description is open; the API stays on 127.0.0.1 only.
        assert (await api.client.get("/v1/openapi.json")).json()["openapi"] == "3.1.0"
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as other:
                await other.get(f"http://[::1]:{api.agent.settings.api_port}/v1/status")


async def test_documents_are_stored_with_exact_counts_and_errors_name_the_field(
    fresh_vhost: str, tmp_path: Path
) -> None:
    async with fake_central(fresh_vhost) as central, served(fresh_vhost, tmp_path) as api:
        one = await api.call(
            "POST", "/v1/documents", 201, json={"type": "receipt", "body": receipt()}
        )
        assert one["seq"] == 1
        assert one["type"] == "receipt"
        bad = receipt(100)
        bad["total"] = 1.5
        many = await api.call(
            "POST",
            "/v1/documents",
            200,
            json=[
                {"type": "receipt", "body": receipt(200)},
                {"type": "receipt", "body": bad},
                {"type": "no_such_type", "body": {}},
                "not a document",
                {"type": "receipt", "body": receipt(300)},
            ],
        )
        assert (many["ok"], many["stored"]) == (False, 2)
        assert [r.get("seq") for r in many["results"]] == [2, None, None, None, 3]
        errors = [r["error"] for r in many["results"] if "error" in r]
        assert [(e["code"], e["field"]) for e in errors] == [
            ("float_not_allowed", "body.total"),
            ("unknown_type", "type"),
            ("wrong_type", ""),
        ]
        all_good = await api.call(
            "POST", "/v1/documents", 201, json=[{"type": "receipt", "body": receipt(400)}]
        )
        assert all_good["results"][0]["seq"] == 4
        # Refused ones never take a seq; pending is exact.
        status = await api.call("GET", "/v1/status", 200)
        assert (status["last_seq"], status["pending"], status["connected"]) == (4, 4, True)
        assert status["register_id"] == REGISTER
        # Errors: invalid document, missing body, malformed JSON, empty array.
        error = await api.call("POST", "/v1/documents", 422, json={"type": "receipt", "body": bad})
        assert error["error"] == {
            "code": "float_not_allowed",
            "field": "body.total",
            "reason": error["error"]["reason"],
        }
        error = await api.call("POST", "/v1/documents", 422, json={"type": "receipt"})
        assert (error["error"]["code"], error["error"]["field"]) == ("missing_field", "body")
        error = await api.call("POST", "/v1/documents", 400, content=b"{not json")
        assert error["error"]["code"] == "malformed"
        error = await api.call("POST", "/v1/documents", 422, json=[])
        assert error["error"]["code"] == "out_of_range"
        response = await api.client.post(
            "/v1/documents", headers=AUTH, content=b" " * (17 * 1024 * 1024)
        )
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"
        # Unknown routes and methods answer with the same error shape.
        response = await api.client.get("/v1/nothing", headers=AUTH)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        response = await api.client.delete("/v1/documents", headers=AUTH)
        assert response.status_code == 405
        assert response.json()["error"]["code"] == "method_not_allowed"
        await wait_for(lambda: _true(len(central.documents) >= 4), "the documents at central")
        assert api.agent.outbox.counts.last_seq == 4


async def _true(value: bool) -> bool:
    return value


async def test_catalog_queries_and_an_item_edit(fresh_vhost: str, tmp_path: Path) -> None:
    async with fake_central(fresh_vhost) as central:
        central.edit("i-1", item_state("Mléko", 2490, barcodes=["8590001"]))
        central.edit("i-2", item_state("Chléb", 3990))
        central.edit("i-2", {"gross_price": 3500, "currency": "CZK"}, entity="prices", scope=CENTER)
        central.edit("vat-21", {"name": "VAT 21", "rate_bp": 2100}, entity="taxes")
        async with served(fresh_vhost, tmp_path) as api:
            await wait_for(lambda: synced(api, {"global": 3, CENTER: 1}), "the start-up delta")
            item = await api.call("GET", "/v1/catalog/items/i-1", 200)
            assert (item["key"], item["state"]["name"]) == ("i-1", "Mléko")
            assert item["price"] == {
                "item_key": "i-1",
                "gross_price": 2490,
                "currency": "CZK",
                "source": "global",
            }
            found = await api.call("GET", "/v1/catalog/items", 200, params={"barcode": "8590001"})
            assert [i["key"] for i in found["items"]] == ["i-1"]
            found = await api.call("GET", "/v1/catalog/items", 200, params={"barcode": "0"})
            assert found["items"] == []
            found = await api.call(
                "GET", "/v1/catalog/items", 200, params={"search": "CHL", "limit": 5}
            )
            assert [i["key"] for i in found["items"]] == ["i-2"]
            price = await api.call("GET", "/v1/catalog/prices/i-2", 200)
            assert (price["gross_price"], price["source"]) == (3500, "center")
            tax = await api.call("GET", "/v1/catalog/taxes/vat-21", 200)
            assert tax["state"]["rate_bp"] == 2100
            taxes = await api.call("GET", "/v1/catalog/taxes", 200)
            assert [e["key"] for e in taxes["entries"]] == ["vat-21"]
            # What is not there, and what cannot be asked.
            error = await api.call("GET", "/v1/catalog/items/nope", 404)
            assert (error["error"]["code"], error["error"]["field"]) == ("unknown_item", "key")
            error = await api.call("GET", "/v1/catalog/prices/nope", 404)
            assert error["error"]["code"] == "unknown_item"
            error = await api.call("GET", "/v1/catalog/taxes/nope", 404)
            assert error["error"]["code"] == "not_found"
            error = await api.call("GET", "/v1/catalog/things/x", 422)
            assert (error["error"]["code"], error["error"]["field"]) == ("invalid_value", "entity")
            error = await api.call("GET", "/v1/catalog/things", 422)
            assert error["error"]["field"] == "entity"
            error = await api.call("GET", "/v1/catalog/items", 422)
            assert error["error"]["code"] == "missing_field"
            error = await api.call(
                "GET", "/v1/catalog/items", 422, params={"search": "x", "limit": "0"}
            )
            assert (error["error"]["code"], error["error"]["field"]) == ("out_of_range", "limit")
            # An item edit: the replica at once, and an item_edit document.
            edited = await api.call(
                "POST",
                "/v1/catalog/items/i-1/edit",
                201,
                json={"changes": {"gross_price": 2590}},
            )
            assert (edited["seq"], edited["type"]) == (1, "item_edit")
            item = await api.call("GET", "/v1/catalog/items/i-1", 200)
            assert (item["local_edit"], item["price"]["gross_price"]) == (True, 2590)
            error = await api.call(
                "POST", "/v1/catalog/items/nope/edit", 404, json={"changes": {"name": "x"}}
            )
            assert error["error"]["code"] == "unknown_item"
            error = await api.call("POST", "/v1/catalog/items/i-1/edit", 422, json={"changes": {}})
            assert error["error"]["field"] == "changes"
            await wait_for(lambda: _true(bool(central.documents)), "the item_edit at central")


async def test_sync_commands_history_and_a_busy_sync(fresh_vhost: str, tmp_path: Path) -> None:
    async with fake_central(fresh_vhost) as central:
        central.edit("i-1")
        async with served(fresh_vhost, tmp_path) as api:
            await wait_for(lambda: synced(api, {"global": 1, CENTER: 0}), "the start-up delta")
            report = await api.call("POST", "/v1/sync/catalog", 200)
            assert (report["result"], report["nothing_new"]) == ("successful", True)
            central.edit("i-2")
            central.answer_delay = 1.0
            first = asyncio.create_task(
                api.call("POST", "/v1/sync/catalog", 200, json={"entities": ["items"]})
            )
            await wait_for(
                lambda: _true(api.agent.catalog_sync.running is not None), "the sync to start"
            )
            busy = await api.call("POST", "/v1/sync/reinit", 409, json={"mode": "update"})
            assert busy["error"]["code"] == "sync_busy"
            assert (await first)["applied"] == 1
            central.answer_delay = 0
            report = await api.call(
                "POST", "/v1/sync/reinit", 200, json={"mode": "replace", "with_customers": False}
            )
            assert (report["kind"], report["mode"], report["result"]) == (
                "reinit",
                "replace",
                "successful",
            )
            error = await api.call("POST", "/v1/sync/reinit", 422, json={"mode": "sideways"})
            assert (error["error"]["code"], error["error"]["field"]) == ("invalid_value", "mode")
            error = await api.call("POST", "/v1/sync/catalog", 422, json={"entities": ["nope"]})
            assert error["error"]["field"] == "entities"
            error = await api.call("POST", "/v1/sync/catalog", 422, json=["items"])
            assert error["error"]["code"] == "wrong_type"
            history = await api.call("GET", "/v1/history", 200, params={"kind": "reinit"})
            assert [r["result"] for r in history["runs"]] == ["successful"]
            history = await api.call("GET", "/v1/history", 200, params={"limit": 3})
            assert len(history["runs"]) == 3
            error = await api.call("GET", "/v1/history", 422, params={"kind": "everything"})
            assert error["error"]["field"] == "kind"


async def test_documents_sync_records_sent_received_and_rejections(
    fresh_vhost: str, tmp_path: Path
) -> None:
    async with fake_central(fresh_vhost) as central, served(fresh_vhost, tmp_path) as api:
        await wait_for(
            lambda: _true(api.agent.history.last_of("documents") is not None),
            "the start-up sweep",
        )
        startup = api.agent.history.last_of("documents")
        assert startup is not None
        assert (startup.result, startup.sent, startup.detail["trigger"]) == (
            "successful",
            0,
            "start-up",
        )
        await api.call(
            "POST",
            "/v1/documents",
            201,
            json=[{"type": "receipt", "body": receipt(100 + n)} for n in range(3)],
        )
        await wait_for(lambda: _true(len(central.documents) >= 3), "the first publishes")

        async def answer() -> None:
            # Central answers the resent documents: two accepted, one rejected.
            await wait_for(lambda: _true(len(central.documents) >= 6), "the resends")
            await central.ack(1)
            await central.ack(2, rejection_code="invalid_value")
            await central.ack(3)

        answering = asyncio.create_task(answer())
        run = await api.call("POST", "/v1/sync/documents", 200)
        await answering
        assert (run["kind"], run["result"], run["sent"], run["received"]) == (
            "documents",
            "partially_successful",
            3,
            3,
        )
        assert run["detail"]["trigger"] == "manual"
        (rejection,) = run["errors"]
        assert rejection.startswith("seq 2 (receipt, ")
        assert "invalid_value" in rejection
        status = await api.call("GET", "/v1/status", 200)
        assert (status["pending"], status["acknowledged"], status["rejected"]) == (0, 2, 1)
        assert status["documents_sync"]["last_sync"]["id"] == run["id"]
        # Nothing open: a sweep is successful at once.
        run = await api.call("POST", "/v1/sync/documents", 200)
        assert (run["result"], run["sent"]) == ("successful", 0)
        history = await api.call("GET", "/v1/history", 200, params={"kind": "documents"})
        assert [r["detail"]["trigger"] for r in history["runs"]] == [
            "manual",
            "manual",
            "start-up",
        ]


async def test_documents_sync_fails_without_the_broker(fresh_vhost: str, tmp_path: Path) -> None:
    parts = urlsplit(fresh_vhost)
    async with (
        fake_central(fresh_vhost),
        FaultProxy(parts.hostname or "127.0.0.1", parts.port or 5672) as proxy,
        served(proxy.url_for(fresh_vhost), tmp_path) as api,
    ):
        proxy.cut()
        await wait_for(lambda: _true(not api.agent.link.state.connected), "the link to drop")
        await api.call("POST", "/v1/documents", 201, json={"type": "receipt", "body": receipt()})
        run = await api.call("POST", "/v1/sync/documents", 200)
        assert (run["result"], run["sent"], run["received"]) == ("failed", 0, 0)
        assert run["errors"][0].startswith("not connected")
        status = await api.call("GET", "/v1/status", 200)
        assert (status["connected"], status["pending"]) == (False, 1)


async def read_events(
    lines: AsyncIterator[str], wanted: Callable[[str, dict[str, Any]], bool]
) -> list[tuple[str, dict[str, Any]]]:
    """Read server-sent events until one is ``wanted``; returns all read."""
    events: list[tuple[str, dict[str, Any]]] = []
    name, data = "", ""
    async for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
        elif line == "" and name:
            events.append((name, json.loads(data)))
            if wanted(name, events[-1][1]):
                return events
            name, data = "", ""
    raise AssertionError(f"the stream ended; events: {events}")


async def test_event_stream_carries_catalog_changes_and_sync_results(
    fresh_vhost: str, tmp_path: Path
) -> None:
    async with fake_central(fresh_vhost) as central:
        central.edit("i-1")
        async with served(fresh_vhost, tmp_path) as api:
            await wait_for(lambda: synced(api, {"global": 1, CENTER: 0}), "the start-up delta")
            async with api.client.stream("GET", "/v1/events", headers=AUTH) as stream:
                assert stream.status_code == 200
                assert stream.headers["content-type"].startswith("text/event-stream")
                lines = stream.aiter_lines()
                (ready,) = await asyncio.wait_for(read_events(lines, lambda n, d: n == "ready"), 10)
                assert ready[1]["register_id"] == REGISTER
                await central.publish(central.edit("i-2", item_state("Rohlík 2")))
                events = await asyncio.wait_for(read_events(lines, lambda n, d: n == "catalog"), 10)
                assert events[-1][1] == {
                    "entity": "items",
                    "key": "i-2",
                    "scope": "global",
                    "op": "upsert",
                    "version": 1,
                    "source": "change",
                }
                await api.call("POST", "/v1/sync/catalog", 200)
                events = await asyncio.wait_for(read_events(lines, lambda n, d: n == "sync"), 10)
                assert events[-1][1]["kind"] == "catalog_delta"
                assert events[-1][1]["result"] == "successful"
            # The client went away: it is unsubscribed.
            await wait_for(lambda: _true(not api.agent.history.on_finish), "the unsubscribe")


async def test_a_slow_event_client_loses_the_oldest_and_is_told() -> None:
    # Over a socket the kernel's buffers hide a slow reader; the queue is tested directly.
    queue = EventQueue(2)
    for k in range(5):
        queue.push("catalog", {"key": f"i-{k}"})
    closed: list[bool] = []
    stream = event_stream(queue, {"register_id": REGISTER}, 0.05, lambda: closed.append(True))
    frames = [await anext(stream) for _ in range(5)]
    assert frames[0].startswith("retry: 3000\n\nid: 0\nevent: ready\n")
    assert frames[1] == 'id: 1\nevent: dropped\ndata: {"count": 3}\n\n'
    assert [f.split("\n")[1] for f in frames[2:4]] == ["event: catalog"] * 2
    assert '"i-3"' in frames[2]
    assert '"i-4"' in frames[3]
    assert frames[4] == ": keepalive\n\n"  # idle
    queue.close()
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert closed == [True]


async def test_stopping_the_agent_ends_event_streams_and_the_server(
    fresh_vhost: str, tmp_path: Path
) -> None:
    async with fake_central(fresh_vhost):
        async with served(fresh_vhost, tmp_path) as api:
            port = api.agent.settings.api_port
            async with api.client.stream("GET", "/v1/events", headers=AUTH) as stream:
                lines = stream.aiter_lines()
                await asyncio.wait_for(read_events(lines, lambda n, d: n == "ready"), 10)
                started = time.monotonic()
                api.agent.stop()
                with pytest.raises(AssertionError, match="the stream ended"):
                    await asyncio.wait_for(read_events(lines, lambda n, d: False), 10)
                assert time.monotonic() - started < 5
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient() as client:
                await client.get(f"http://127.0.0.1:{port}/v1/status")


async def test_a_port_in_use_fails_the_start_up(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = load_settings(
            None,
            register_id=REGISTER,
            center_id=CENTER,
            data_dir=tmp_path,
            api_port=port,
            api_token=TOKEN,
            amqp_url="amqp://127.0.0.1:1/",
        )
        async with Agent(settings) as agent:
            with pytest.raises(Exception, match="api_port") as failed:
                await asyncio.wait_for(agent.run(), 10)
            assert getattr(failed.value, "code", None) == "config_error"


def test_the_openapi_document_describes_every_route(tmp_path: Path) -> None:
    settings = load_settings(
        None,
        register_id=REGISTER,
        center_id=CENTER,
        data_dir=tmp_path,
        api_port=free_port(),
        api_token=TOKEN,
    )
    agent = Agent(settings, serve_socket=False)
    assert agent.local_api is not None
    routes = [r for r in agent.local_api.app.routes if isinstance(r, Route)]
    documented = {(method, path) for path, ops in OPENAPI["paths"].items() for method in ops}
    served_ = {
        (method.lower(), route.path)
        for route in routes
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert served_ == documented
    assert OPENAPI["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, ops in OPENAPI["paths"].items():
        for method, op in ops.items():
            if path != "/v1/openapi.json":
                assert "401" in op["responses"], (method, path)
    # The API is off without a token or with port 0.
    assert Agent(settings.model_copy(update={"api_token": None})).local_api is None
    assert Agent(settings.model_copy(update={"api_port": 0})).local_api is None


async def test_every_operation_answers_as_documented(fresh_vhost: str, tmp_path: Path) -> None:
    """One pass over every JSON operation; each answer is validated by ``Api.call``."""
    async with fake_central(fresh_vhost) as central:
        central.edit("i-1", item_state("Mléko", barcodes=["1"]))
        async with served(fresh_vhost, tmp_path, ack_timeout_s=0.5, publish_timeout_s=1) as api:
            await wait_for(lambda: synced(api, {"global": 1, CENTER: 0}), "the start-up delta")
            await api.call(
                "POST", "/v1/documents", 201, json={"type": "receipt", "body": receipt()}
            )
            await api.call("GET", "/v1/status", 200)
            await api.call("GET", "/v1/catalog/items", 200, params={"barcode": "1"})
            await api.call("GET", "/v1/catalog/items/i-1", 200)
            await api.call(
                "POST", "/v1/catalog/items/i-1/edit", 201, json={"changes": {"name": "M"}}
            )
            await api.call("GET", "/v1/catalog/prices/i-1", 200)
            await api.call("GET", "/v1/catalog/items/i-1", 200)
            await api.call("GET", "/v1/catalog/items", 200, params={"search": "mlé"})
            await api.call("GET", "/v1/catalog/taxes/x", 404)
            await api.call("GET", "/v1/catalog/taxes", 200)
            await api.call("POST", "/v1/sync/catalog", 200)
            await api.call("POST", "/v1/sync/reinit", 200, json={"mode": "update"})
            central.silent = True  # the acks never come: the sweep waits, then gives up
            await api.call("POST", "/v1/sync/documents", 200)
            await api.call("GET", "/v1/history", 200)
            await api.call("GET", "/v1/openapi.json", 200)
    json_operations = {
        (method, path)
        for path, ops in OPENAPI["paths"].items()
        for method in ops
        if path != "/v1/events"
    }
    assert json_operations <= api.seen, sorted(json_operations - api.seen)
