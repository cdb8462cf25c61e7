"""Catalog sync against a real broker: the agent's delta RPC, real-time changes, gaps,
reinits, one sync at a time, edit conflicts. Central's side is a test responder
(:mod:`catalog_responder`) on aio-pika, not a mock of RabbitMQ."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tillsync_agent import Agent, load_settings
from tillsync_agent.catalog_sync import SyncBusyError
from tillsync_agent.control_socket import request_stream
from tillsync_agent.history import read_runs
from tillsync_protocol import ItemEdit

from .catalog import item_state
from .catalog_responder import CENTER, REGISTER, FakeCentral, fake_central


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], what: str, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_agent(amqp_url: str, data_dir: Path, **overrides: Any) -> AsyncIterator[Agent]:
    values: dict[str, Any] = {
        "register_id": REGISTER,
        "center_id": CENTER,
        "amqp_url": amqp_url,
        "data_dir": data_dir,
        "publish_timeout_s": 5.0,
        "ack_timeout_s": 5.0,
        "retry_base_s": 0.2,
        "retry_cap_s": 1.0,
        "reconnect_base_s": 0.2,
        "reconnect_cap_s": 1.0,
        "delta_timeout_s": 3.0,
        "delta_page_size": 3,
    }
    values.update(overrides)
    async with Agent(load_settings(None, **values)) as agent:
        task = asyncio.create_task(agent.run())
        try:
            yield agent
        finally:
            agent.stop()
            await asyncio.wait_for(task, timeout=30)


def runs(data_dir: Path) -> list[dict[str, Any]]:
    """The catalog syncs of the history (deltas and reinits), newest first."""
    with sqlite3.connect(data_dir / "agent.sqlite3") as db:
        return [run.to_dict() for run in read_runs(db) if run.kind != "documents"]


async def cursors_are(agent: Agent, expected: dict[str, int]) -> bool:
    """The replica reached ``expected`` and no sync is running any more."""
    return await agent.replica.cursors() == expected and agent.catalog_sync.running is None


async def test_startup_delta_then_real_time_changes_then_a_gap(
    fresh_vhost: str, tmp_path: Path
) -> None:
    async with fake_central(fresh_vhost) as central:
        for k in range(7):
            central.edit(f"i-{k}", item_state(f"item {k}", barcodes=[f"b{k}"]))
        central.edit("i-0", delete=True)
        central.edit("i-1", {"gross_price": 1, "currency": "CZK"}, entity="prices", scope=CENTER)
        async with running_agent(fresh_vhost, tmp_path) as agent:
            await wait_for(lambda: cursors_are(agent, {"global": 8, CENTER: 1}), "start-up delta")
            assert [e.key for e in await agent.replica.all("items")] == [
                f"i-{k}" for k in range(1, 7)
            ]
            assert (await agent.replica.price("i-1")).gross_price == 1  # type: ignore[union-attr]
            (request,) = central.requests
            assert request.mode == "delta"
            assert request.cursors == {"global": 0, CENTER: 0}
            # Real time: the next change is applied at once.
            events = agent.catalog_changes()
            await central.publish(central.edit("i-9", item_state("nine")))
            event = await asyncio.wait_for(anext(events), 10)
            assert (event.key, event.source) == ("i-9", "change")
            assert await agent.replica.cursors() == {"global": 9, CENTER: 1}
            # A gap (change 10 never published): change 11 triggers a delta that brings both.
            central.edit("i-10")
            await central.publish(central.edit("i-11"))
            await wait_for(lambda: cursors_are(agent, {"global": 11, CENTER: 1}), "gap delta")
            assert await agent.replica.item("i-10") is not None
            assert len(central.requests) == 2
            assert central.requests[1].cursors == {"global": 9, CENTER: 1}
    history = runs(tmp_path)
    assert [r["kind"] for r in history] == ["catalog_delta", "catalog_delta"]
    assert {r["result"] for r in history} == {"successful"}
    assert history[1]["detail"]["trigger"] == "start-up"
    assert history[0]["detail"]["trigger"] == "gap"


async def test_manual_sync_says_nothing_new_and_refuses_a_second_one(
    fresh_vhost: str, tmp_path: Path
) -> None:
    async with fake_central(fresh_vhost) as central:
        central.edit("i-1")
        async with running_agent(fresh_vhost, tmp_path) as agent:
            await wait_for(lambda: cursors_are(agent, {"global": 1, CENTER: 0}), "start-up")
            report = await agent.sync_catalog()
            assert report.nothing_new
            assert report.result == "successful"
            central.answer_delay = 1.0
            central.edit("i-2")
            first = asyncio.create_task(agent.sync_catalog())
            await asyncio.sleep(0.2)
            with pytest.raises(SyncBusyError) as busy:
                await agent.reinit_catalog("update")
            assert busy.value.code == "sync_busy"
            report = await first
            assert (report.received, report.applied) == (1, 1)
            assert report.cursors == {"global": 2, CENTER: 0}
            # A partial sync applies changes but leaves the cursors.
            central.answer_delay = 0
            central.edit("i-3")
            central.edit("k", {"value": 1}, entity="settings")
            report = await agent.sync_catalog(entities=["items"])
            assert report.applied == 1
            assert report.cursors == {"global": 2, CENTER: 0}
            assert central.requests[-1].entities == ["items"]
            assert await agent.replica.get("settings", "k") is None


async def test_reinit_replace_over_the_socket_with_progress_and_from_a_central_command(
    fresh_vhost: str, tmp_path: Path
) -> None:
    async with fake_central(fresh_vhost) as central:
        for k in range(10):
            central.edit(f"i-{k}")
        central.edit("cust-1", {"name": "Jana"}, entity="customers", scope=CENTER)
        async with running_agent(fresh_vhost, tmp_path) as agent:
            await wait_for(lambda: cursors_are(agent, {"global": 10, CENTER: 1}), "start-up delta")
            # Central deletes items while this register is offline for them... and a local
            # row that central never had is in the replica: replace drops both.
            for k in range(5):
                central.edit(f"i-{k}", delete=True)
            progress: list[dict[str, Any]] = []
            reply = await request_stream(
                agent.settings.socket_path,
                {"op": "reinit", "mode": "replace", "with_customers": False},
                progress.append,
            )
            assert reply["ok"], reply
            report = reply["report"]
            assert (report["mode"], report["received"], report["applied"]) == ("replace", 5, 5)
            assert report["cursors"] == {"global": 10, CENTER: 1}  # without customers: stay
            assert [p["phase"] for p in progress][-1] == "done"
            assert max(p["pages"] for p in progress) == 2
            assert [e.key for e in await agent.replica.all("items")] == [
                f"i-{k}" for k in range(5, 10)
            ]
            assert await agent.replica.get("customers", "cust-1") is not None
            assert central.requests[-1].mode == "snapshot"
            assert central.requests[-1].with_customers is False
            # A reinit command from central runs on its own.
            await central.command_reinit("update")
            await wait_for(lambda: cursors_are(agent, {"global": 15, CENTER: 1}), "reinit command")
    kinds = [(r["kind"], r["detail"]["trigger"]) for r in runs(tmp_path)]
    assert kinds[0][0] == "reinit"
    assert kinds[0][1].startswith("central ")


async def test_no_answer_fails_the_run_and_changes_nothing(
    fresh_vhost: str, tmp_path: Path
) -> None:
    async with fake_central(fresh_vhost) as central:
        central.edit("i-1")
        central.silent = True
        async with running_agent(
            fresh_vhost, tmp_path, delta_timeout_s=0.5, retry_base_s=60, retry_cap_s=60
        ) as agent:

            async def startup_ended() -> bool:
                last = agent.history.last_of("catalog_delta")
                return last is not None and agent.catalog_sync.running is None

            await wait_for(startup_ended, "the start-up delta to give up")
            last = agent.history.last_of("catalog_delta")
            assert last is not None
            assert last.result == "failed"
            assert "no reply from central" in last.errors[0]
            assert await agent.replica.all("items") == []
            assert await agent.replica.cursors() == {}
            central.silent = False
            report = await agent.sync_catalog()
            assert report.result == "successful"
            assert await agent.replica.cursors() == {"global": 1, CENTER: 0}
    assert runs(tmp_path)[-1]["result"] == "failed"


async def test_an_edit_conflict_brings_centrals_state_back(
    fresh_vhost: str, tmp_path: Path
) -> None:
    async with fake_central(fresh_vhost) as central:
        central.edit("i-1", item_state(price=100))
        async with running_agent(fresh_vhost, tmp_path) as agent:
            await wait_for(lambda: cursors_are(agent, {"global": 1, CENTER: 0}), "start-up")
            submitted = await agent.edit_item("i-1", {"gross_price": 80})
            item = await agent.replica.item("i-1")
            assert item is not None
            assert item.local_edit
            assert item.state["gross_price"] == 80

            async def document_arrived() -> bool:
                return len(central.documents) == 1

            await wait_for(document_arrived, "the item_edit document")
            (document,) = central.documents
            assert isinstance(document, ItemEdit)
            assert (document.body.item_id, document.body.base_version) == ("i-1", 1)
            # Someone else changed the item at central first: the edit lost.
            central.edit("i-1", item_state(price=120))
            await central.ack(submitted.seq, rejection_code="edit_conflict")

            async def converged() -> bool:
                entry = await agent.replica.item("i-1")
                return entry is not None and not entry.local_edit

            await wait_for(converged, "the replica to take central's state")
            item = await agent.replica.item("i-1")
            assert item is not None
            assert (item.state["gross_price"], item.version) == (120, 2)
            assert agent.outbox.counts.rejected == 1
    assert runs(tmp_path)[0]["detail"]["trigger"] == "edit_conflict"


async def test_cursor_ahead_is_answered_by_a_replace(fresh_vhost: str, tmp_path: Path) -> None:
    async with fake_central(fresh_vhost) as central:
        central.edit("i-1")
        central.error_code = "cursor_ahead"
        async with running_agent(fresh_vhost, tmp_path) as agent:
            await wait_for(lambda: cursors_are(agent, {"global": 1, CENTER: 0}), "the replace")
            assert [r.mode for r in central.requests][:2] == ["delta", "snapshot"]
    history = runs(tmp_path)
    assert history[-1]["result"] == "failed"
    assert "cursor_ahead" in json.dumps(history[-1]["errors"])
    assert history[-2]["detail"]["trigger"] == "cursor_ahead"


async def test_the_cli_syncs_through_the_service_and_reads_the_catalog(
    fresh_vhost: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "TILLSYNC_REGISTER_ID": REGISTER,
        "TILLSYNC_CENTER_ID": CENTER,
        "TILLSYNC_DATA_DIR": str(tmp_path),
        "TILLSYNC_AMQP_URL": fresh_vhost,
        "COLUMNS": "200",
    }

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            [str(Path(sys.executable).parent / "tillsync-agent"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    async with fake_central(fresh_vhost) as central:
        central.edit("i-1", item_state("Máslo", barcodes=["8590001"]))
        async with running_agent(fresh_vhost, tmp_path) as agent:
            await wait_for(lambda: cursors_are(agent, {"global": 1, CENTER: 0}), "start-up")
            done = await cli("sync", "--catalog")
            assert done.returncode == 0, done.stderr
            assert "nothing new" in done.stdout
            central.edit("i-2", item_state("Mléko"))
            done = await cli("reinit", "--mode", "replace", "--entities", "items")
            assert done.returncode == 0, done.stderr
            assert "successful" in done.stdout
            assert "replace" in done.stdout
            busy = await cli("reinit", "--mode", "sideways")
            assert busy.returncode == 2
        found = await cli("catalog", "item", "--barcode", "8590001", "--json")
        assert found.returncode == 0, found.stderr
        assert json.loads(found.stdout)["key"] == "i-1"
        assert json.loads(found.stdout)["price"]["gross_price"] == 390
        listed = await cli("catalog", "search", "mlé", "--json")
        assert [e["key"] for e in json.loads(listed.stdout)] == ["i-2"]
        history = await cli("history", "--json")
        assert [r["kind"] for r in json.loads(history.stdout) if r["kind"] != "documents"] == [
            "reinit",
            "catalog_delta",
            "catalog_delta",
        ]


async def test_real_time_changes_during_a_sync_are_held_then_rechecked(
    fresh_vhost: str, tmp_path: Path
) -> None:
    async with fake_central(fresh_vhost) as central:
        central.edit("i-1")
        async with running_agent(fresh_vhost, tmp_path) as agent:
            await wait_for(lambda: cursors_are(agent, {"global": 1, CENTER: 0}), "start-up")
            central.answer_delay = 1.0
            sync = asyncio.create_task(agent.sync_catalog())
            await wait_for(lambda: _asked(central, 2), "the delta request")
            # Committed and published while the delta runs: the delta will cover it.
            await central.publish(central.edit("i-2"))
            await asyncio.sleep(0.3)
            assert await agent.replica.item("i-2") is None  # held, not applied yet
            report = await sync
            assert report.cursors == {"global": 2, CENTER: 0}
            # After the delta, the held change was a duplicate: no gap, no further request.
            await central.publish(central.edit("i-3"))
            await wait_for(lambda: cursors_are(agent, {"global": 3, CENTER: 0}), "change 3")
            assert len(central.requests) == 2


async def _asked(central: FakeCentral, n: int) -> bool:
    return len(central.requests) >= n


async def test_a_burst_of_changes_is_applied_in_order_without_a_delta(
    fresh_vhost: str, tmp_path: Path
) -> None:
    # Changes that arrive while others are being applied are applied together: 300 in a
    # burst must still land in order, each exactly once, with no gap seen on the way.
    async with fake_central(fresh_vhost) as central, running_agent(fresh_vhost, tmp_path) as agent:
        await wait_for(lambda: cursors_are(agent, {"global": 0, CENTER: 0}), "start-up")
        burst = [central.edit(f"i-{n:03d}", item_state(f"n{n}", price=n)) for n in range(300)]
        events: list[str] = []
        transactions: list[int] = []
        apply_changes = agent.replica.apply_changes

        async def counted(changes: Any) -> Any:
            transactions.append(len(changes))
            return await apply_changes(changes)

        agent.replica.apply_changes = counted  # type: ignore[method-assign]
        agent.on_change(lambda event: events.append(str(event.key)))
        # As the register queue's consumer calls it: one task per delivery, in order.
        await asyncio.gather(*(agent.catalog_sync.on_change(change) for change in burst))
        assert await agent.replica.cursors() == {"global": 300, CENTER: 0}
        assert events == [f"i-{n:03d}" for n in range(300)]
        items = sorted(await agent.replica.all("items"), key=lambda e: e.key)
        assert [(e.key, e.state["gross_price"]) for e in items] == [
            (f"i-{n:03d}", n) for n in range(300)
        ]
        assert len(central.requests) == 1  # the start-up delta only
        assert sum(transactions) == 300
        assert len(transactions) < 100
