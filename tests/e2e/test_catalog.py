"""The catalog end to end (issue #5): the real ``tillsync-central run`` (relay, delta RPC,
ingest of item edits) and real register agents, over RabbitMQ and PostgreSQL, under
real faults. Every test ends by comparing both sides in full: each replica holds exactly
central's live rows for it (``catalog_entities`` of ``global`` and its center, filtered
by its labels), row by row with version, ``scope_seq`` and state, and its cursors are
central's ``last_seq``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest

from central.catalog_client import Requester
from e2e.catalog_helpers import (
    cap_register_queue,
    catalog_runs,
    central_rows,
    churn,
    delete,
    edit,
    fast_settings,
    item,
    last_seqs,
    provision_many,
    queue_depth,
    replica_cursors,
    replica_query,
    replica_rows,
    running_agents,
    set_cursors,
    tamper,
    upsert,
    wait_converged,
    wait_idle,
    without_customers,
)
from e2e.conftest import BIN, Central, wait_for, write_agent_config
from e2e.test_agent_process import cli, start_agent
from faults import FaultProxy
from register_ids import reg
from tillsync_protocol import CUSTOMER_ENTITIES, topology

CENTER = "c-1"
OTHER = "c-2"


@pytest.fixture
def cat(central: Central) -> Central:
    """The running central (the ``central`` fixture deletes its registers' broker users)."""
    return central


async def central_cli(central: Central, *args: str) -> tuple[int, str, str]:
    """``tillsync-central ARGS`` on the running central's broker and database."""
    process = await asyncio.create_subprocess_exec(
        str(BIN / "tillsync-central"),
        *args,
        env={**central.env(), "TILLSYNC_LOG_FORMAT": "console", "COLUMNS": "250"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a table rich printed (cells stripped)."""
    return [
        [cell.strip() for cell in line.strip().strip("│").split("│")]
        for line in text.splitlines()
        if line.startswith("│")
    ]


async def seed(central: Central, items: int = 20) -> None:
    await edit(
        central,
        [upsert("global", "taxes", "vat-21", {"name": "VAT 21 %", "rate_bp": 2100})]
        + [
            upsert("global", "items", f"i-{n}", item(f"Item {n}", 100 + n, barcodes=[f"859{n}"]))
            for n in range(items)
        ],
    )


async def test_price_changes_reach_every_register_of_their_scope_and_no_other(
    cat: Central, tmp_path: Path
) -> None:
    """50 registers in one center, 3 in another: a center price reaches the 50 and none
    of the 3, a global price reaches all 53; every replica ends equal to central."""
    await seed(cat)
    here = await provision_many(cat, CENTER, [reg(f"r-{n:02d}") for n in range(50)])
    there = await provision_many(cat, OTHER, [reg(f"s-{n}") for n in range(3)])
    settings = [fast_settings(e, tmp_path / e.register_id) for e in here + there]
    async with running_agents(settings) as agents:
        for s in settings:
            await wait_converged(cat, s)
        await edit(
            cat,
            [
                upsert(CENTER, "prices", "i-1", {"gross_price": 77, "currency": "CZK"}),
                upsert(CENTER, "items", "i-2", item("Item 2 (c-1)", 222, barcodes=["8592"])),
                upsert("global", "items", "i-3", item("Item 3", 333, barcodes=["8593"])),
                delete("global", "items", "i-4"),
            ],
        )
        for s in settings:
            await wait_converged(cat, s)
        for agent in agents:
            price_1 = await agent.replica.price("i-1")
            price_2 = await agent.replica.price("i-2")
            price_3 = await agent.replica.price("i-3")
            assert price_1 is not None
            assert price_2 is not None
            assert price_3 is not None
            assert price_3.gross_price == 333
            if agent.settings.center_id == CENTER:
                assert (price_1.gross_price, price_1.source) == (77, "center")
                assert price_2.gross_price == 222
                scanned = await agent.replica.item_by_barcode("8592")
                assert scanned is not None
                assert scanned.scope == CENTER
            else:
                assert (price_1.gross_price, price_1.source) == (101, "global")
                assert price_2.gross_price == 102
        for agent in agents:
            assert await agent.replica.item("i-4") is None
        for s in settings[50:]:
            assert not any(scope == CENTER for _, _, scope in await replica_rows(s))
    assert await central_rows(cat, OTHER) != await central_rows(cat, CENTER)


async def test_a_register_offline_during_1000_changes_catches_up_by_delta(
    cat: Central, tmp_path: Path
) -> None:
    """The register's network is cut (a fault proxy) while central makes 1,000 changes
    (global items created, changed, deleted; the center's prices and stock): on
    reconnect a delta brings the replica to central's state exactly."""
    await seed(cat)
    enrollment = await cat.provision(CENTER, reg("r-off"))
    async with FaultProxy("127.0.0.1", 5672) as proxy:
        settings = fast_settings(enrollment, tmp_path, amqp_url=proxy.url_for(enrollment.amqp_url))
        async with running_agents([settings]) as (agent,):
            await wait_converged(cat, settings)
            before = await replica_rows(settings)
            proxy.cut()  # the shop's line goes down; the agent keeps running

            async def link_down() -> bool:
                return not agent.link.state.connected

            await wait_for(link_down, timeout=10, what="the agent to notice the cut")
            assert await edit(cat, churn(1000, CENTER)) == 1000
            assert await replica_rows(settings) == before  # nothing got through
            proxy.heal()
            rows = await wait_converged(cat, settings, timeout=60)
    assert len(rows) > len(before)
    deltas = [r for r in catalog_runs(settings) if r["detail"].get("trigger") == "reconnect"]
    assert deltas, catalog_runs(settings)
    assert deltas[-1]["result"] == "successful"
    assert deltas[-1]["detail"]["applied"] > 0
    assert deltas[-1]["detail"]["cursors"] == await last_seqs(cat, CENTER)


async def test_changes_dropped_by_a_full_queue_are_recovered_by_delta(
    cat: Central, tmp_path: Path
) -> None:
    """The register's queue holds 5 messages; 300 changes while the register is off:
    295 are dropped by the broker (oldest first), the agent recovers them by delta."""
    await seed(cat)
    enrollment = await cat.provision(CENTER, reg("r-ovf"))
    settings = fast_settings(enrollment, tmp_path)
    async with running_agents([settings]):
        await wait_converged(cat, settings)
    await cap_register_queue(cat, enrollment.register_id, 5)
    assert await edit(cat, churn(300, CENTER, seed=9)) == 300
    queue = topology.register_queue(enrollment.register_id)

    async def published_and_dropped() -> bool:
        positions = dict(await cat.pool.fetch("SELECT scope, published_seq FROM relay_positions"))
        return positions == await last_seqs(cat, CENTER) and await queue_depth(cat, queue) == 5

    await wait_for(published_and_dropped, timeout=30, what="all published, all but 5 dropped")
    async with running_agents([settings]) as (agent,):
        await wait_converged(cat, settings)

        async def drained() -> bool:
            return await queue_depth(cat, queue) == 0

        await wait_for(drained, timeout=10, what="the 5 kept messages to be consumed")
        assert agent.catalog_sync.running is None
    startup = [r for r in catalog_runs(settings) if r["detail"].get("trigger") == "start-up"]
    assert startup[-1]["result"] == "successful"
    assert startup[-1]["detail"]["applied"] > 5


@pytest.mark.slow
async def test_relay_sigkilled_mid_stream_then_restarted(cat: Central, tmp_path: Path) -> None:
    """Central (relay, RPC, ingest) is SIGKILLed while changes are written and published;
    the changes written meanwhile wait in the changelog, the restarted relay publishes
    from its stored position (what it had published but not recorded goes out again and
    the register drops it), and the replica ends exactly equal to central, each cursor at
    its scope's last_seq."""
    await seed(cat)
    enrollment = await cat.provision(CENTER, reg("r-relay"))
    settings = fast_settings(enrollment, tmp_path)
    edits = churn(3000, CENTER, seed=11)
    async with running_agents([settings]) as (agent,):
        await wait_converged(cat, settings)
        first = await last_seqs(cat, CENTER)
        writer = asyncio.create_task(edit(cat, edits, batch=25, pause=0.02))

        async def publishing() -> bool:
            published = await cat.pool.fetchval(
                "SELECT published_seq FROM relay_positions WHERE scope = 'global'"
            )
            return published is not None and published > first["global"] + 200

        await wait_for(publishing, timeout=30, what="the relay to publish part of the stream")
        cat.kill()
        assert not writer.done(), "the stream ended before the kill: not mid-stream"
        killed_at = await agent.replica.cursors()
        assert await writer == len(edits)
        positions = dict(await cat.pool.fetch("SELECT scope, published_seq FROM relay_positions"))
        assert positions["global"] < (await last_seqs(cat, CENTER))["global"]
        assert sum(killed_at.values()) > sum(first.values())  # it was receiving the stream
        await cat.start()
        await wait_converged(cat, settings, timeout=90)
    positions = dict(await cat.pool.fetch("SELECT scope, published_seq FROM relay_positions"))
    assert positions == await last_seqs(cat, CENTER)
    assert await replica_cursors(settings) == positions


@pytest.mark.slow
async def test_reinit_replace_killed_midway_keeps_the_old_catalog_and_a_rerun_completes(
    cat: Central, tmp_path: Path
) -> None:
    """``tillsync-agent reinit --mode replace`` over the socket of a ``tillsync-agent run``
    that is SIGKILLed while the snapshot's pages are being staged: the replica is exactly
    what it was, and a rerun after a restart swaps central's catalog in."""
    await seed(cat, items=3000)
    enrollment = await cat.provision(CENTER, reg("r-reinit"))
    settings = fast_settings(enrollment, tmp_path / "data", delta_page_size=20)
    config = write_agent_config(settings, tmp_path / "agent.toml")
    log = tmp_path / "agent.log"
    agent = await start_agent(config, log)
    try:
        await wait_converged(cat, settings)
    finally:
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), 30) == 0
    # What a replace must repair and a delta cannot: a row central never had, and a
    # row whose state is not central's although its scope_seq is.
    corrupted = (await replica_rows(settings))[("items", "i-5", "global")]
    tamper(
        settings,
        {
            ("items", "stray", "global"): (1, 1, item("Stray")),
            ("items", "i-5", "global"): (corrupted[0], corrupted[1], item("Item 5", 1)),
        },
    )
    runs = len(catalog_runs(settings))
    agent = await start_agent(config, log)
    try:
        await wait_idle(settings, more_than=runs)  # the start-up delta: nothing new
        old = await replica_rows(settings)
        assert ("items", "stray", "global") in old
        reinit = await asyncio.create_subprocess_exec(
            str(BIN / "tillsync-agent"),
            "reinit",
            "--mode",
            "replace",
            "--config",
            str(config),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        async def staging() -> bool:
            ((count,),) = await asyncio.to_thread(
                replica_query, settings, "SELECT count(*) FROM catalog_next"
            )
            return bool(count > 0)

        await wait_for(staging, timeout=30, what="the snapshot to be staged", interval=0.005)
        agent.send_signal(signal.SIGKILL)
        assert await agent.wait() == -signal.SIGKILL
        out, err = await asyncio.wait_for(reinit.communicate(), 30)
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
    assert reinit.returncode == 2, out.decode() + err.decode()
    assert "not_running" in err.decode()
    assert "Traceback" not in err.decode()
    ((staged,),) = replica_query(settings, "SELECT count(*) FROM catalog_next")
    assert 0 < staged < len(old)  # killed midway through the pages
    assert await replica_rows(settings) == old  # the old catalog, untouched
    killed = catalog_runs(settings)[-1]
    assert (killed["kind"], killed["finished"]) == ("reinit", False)

    runs = len(catalog_runs(settings))
    agent = await start_agent(config, log)
    try:
        await wait_idle(settings, more_than=runs)
        (interrupted,) = [r for r in catalog_runs(settings) if r["id"] == killed["id"]]
        assert interrupted["result"] == "failed"
        assert "interrupted" in interrupted["errors"][0]
        code, out_text, err_text = await cli(config, "reinit", "--mode", "replace")
        assert code == 0, out_text + err_text
        assert "successful" in out_text
        rows = await wait_converged(cat, settings)
        assert ("items", "stray", "global") not in rows
        assert rows[("items", "i-5", "global")][2]["gross_price"] == 105
    finally:
        agent.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(agent.wait(), 30) == 0


async def test_reinit_with_and_without_customers(cat: Central, tmp_path: Path) -> None:
    """*update* repairs rows and deletes nothing; *replace* without customers (a command
    from central) swaps every entity but ``customers`` and ``loyalty_balances``, which it
    leaves exactly as they were; *replace* with customers makes the replica central's."""
    enrollment = await cat.provision(CENTER, reg("r-cust"))
    await seed(cat)
    await edit(
        cat,
        [upsert("global", "customers", f"cu-{n}", {"name": f"Customer {n}"}) for n in range(5)]
        + [upsert(CENTER, "loyalty_balances", f"cu-{n}", {"points": 10 * n}) for n in range(5)],
    )
    settings = fast_settings(enrollment, tmp_path)
    async with running_agents([settings]):
        await wait_converged(cat, settings)
    corrupted = (await replica_rows(settings))[("items", "i-3", "global")]
    strays = {
        ("items", "stray", "global"): (1, 1, item("Stray")),
        ("customers", "cu-stray", "global"): (1, 1, {"name": "Not at central"}),
        ("loyalty_balances", "cu-stray", CENTER): (1, 1, {"points": 5, "tier": None}),
    }
    tamper(settings, {**strays, ("items", "i-3", "global"): (*corrupted[:2], item("Bad", 1))})
    runs = len(catalog_runs(settings))
    async with running_agents([settings]) as (agent,):
        await wait_idle(settings, more_than=runs)
        expected = await central_rows(cat, CENTER)

        report = await agent.reinit_catalog("update", with_customers=False)
        assert report.result == "successful", report
        rows = await replica_rows(settings)
        assert rows == {**expected, **strays}  # i-3 repaired, nothing deleted

        runs = len(catalog_runs(settings))
        code, out, err = await central_cli(
            cat,
            "reinit",
            "--register",
            enrollment.register_id,
            "--mode",
            "replace",
            "--without-customers",
        )
        assert code == 0, out + err
        assert f"reinit (replace) sent to {enrollment.register_id}" in out
        await wait_idle(settings, more_than=runs)
        command = catalog_runs(settings)[-1]
        assert command["detail"]["trigger"].startswith("central ")
        assert (command["kind"], command["result"]) == ("reinit", "successful")
        assert command["detail"]["with_customers"] is False
        rows = await replica_rows(settings)
        assert without_customers(rows) == without_customers(expected)  # the stray item gone
        customers = {k: v for k, v in rows.items() if k[0] in CUSTOMER_ENTITIES}
        before = {k: v for k, v in {**expected, **strays}.items() if k[0] in CUSTOMER_ENTITIES}
        assert customers == before  # untouched, strays included

        report = await agent.reinit_catalog("replace", with_customers=True)
        assert report.result == "successful", report
        assert await replica_rows(settings) == expected
        await wait_converged(cat, settings)


async def test_labels_keep_unlabelled_and_matching_items_and_the_cursor_still_advances(
    cat: Central, tmp_path: Path
) -> None:
    """A register labelled ``bar`` keeps items without labels or labelled ``bar`` (also
    when an item's labels change), not those labelled only ``kitchen``, and its cursors
    reach last_seq even when the last changes are kitchen items; a register without
    labels keeps every item."""
    bar = await cat.provision(CENTER, reg("r-bar"))
    everything = await cat.provision(CENTER, reg("r-all"))
    await edit(
        cat,
        [
            upsert("global", "items", "plain", item("Rohlík")),
            upsert("global", "items", "beer", item("Pivo", labels=["bar"])),
            upsert("global", "items", "soup", item("Polévka", labels=["kitchen"])),
            upsert("global", "items", "coffee", item("Káva", labels=["bar", "kitchen"])),
            upsert(CENTER, "items", "steak", item("Steak", labels=["kitchen"])),
            upsert(CENTER, "items", "wine", item("Víno", labels=["bar"])),
        ],
    )
    s_bar = fast_settings(bar, tmp_path / "bar", labels=["bar"])
    s_all = fast_settings(everything, tmp_path / "all")
    async with running_agents([s_bar, s_all]) as (a_bar, a_all):
        rows = await wait_converged(cat, s_bar)
        assert {k for e, k, _ in rows if e == "items"} == {"plain", "beer", "coffee", "wine"}
        assert len(await wait_converged(cat, s_all)) == 6
        # Beer moves to the kitchen, soup to the bar; the last change of each scope is
        # an item the bar register does not keep.
        await edit(
            cat,
            [
                upsert("global", "items", "beer", item("Pivo", labels=["kitchen"])),
                upsert("global", "items", "soup", item("Polévka", labels=["bar"])),
                upsert("global", "items", "grill", item("Gril", labels=["kitchen"])),
                upsert(CENTER, "items", "fries", item("Hranolky", labels=["kitchen"])),
            ],
        )
        rows = await wait_converged(cat, s_bar)
        assert {k for e, k, _ in rows if e == "items"} == {"plain", "soup", "coffee", "wine"}
        assert await a_bar.replica.item("beer") is None
        assert await a_bar.replica.item("grill") is None
        assert await a_bar.replica.item("fries") is None
        assert await a_bar.replica.cursors() == await last_seqs(cat, CENTER)
        assert len(await wait_converged(cat, s_all)) == 8
        assert await a_all.replica.item("grill") is not None
    last = await cat.pool.fetchval(
        "SELECT key FROM catalog_changelog WHERE scope = 'global' ORDER BY scope_seq DESC LIMIT 1"
    )
    assert last == "grill"


async def test_concurrent_edits_of_one_item_one_wins_the_other_is_told_and_all_converge(
    cat: Central, tmp_path: Path
) -> None:
    """Two registers edit the same item from the same version at the same time: central
    applies one (fanned out to every register, both editors included), rejects the other
    with ``edit_conflict`` (a ``catalog_conflicts`` row; a rejected document in that
    register's outbox), and every replica ends at central's state, no local edit left."""
    enrollments = [
        *await provision_many(cat, CENTER, [reg("r-ed1"), reg("r-ed2"), reg("r-ed3")]),
        await cat.provision(OTHER, reg("s-ed")),
    ]
    await seed(cat)
    settings = [fast_settings(e, tmp_path / e.register_id) for e in enrollments]
    async with running_agents(settings) as agents:
        for s in settings:
            await wait_converged(cat, s)
        one, two = agents[0], agents[1]
        before = await one.replica.item("i-7")
        assert before is not None
        assert before.version == 1
        await asyncio.gather(
            one.edit_item(
                "i-7", {"name": f"Edited on {one.settings.register_id}", "gross_price": 111}
            ),
            two.edit_item(
                "i-7", {"name": f"Edited on {two.settings.register_id}", "gross_price": 222}
            ),
        )

        async def answered() -> bool:
            return one.outbox.counts.pending == 0 and two.outbox.counts.pending == 0

        await wait_for(answered, timeout=30, what="central to answer both item edits")
        winner, loser = (one, two) if one.outbox.counts.acknowledged == 1 else (two, one)
        assert (winner.outbox.counts.acknowledged, winner.outbox.counts.rejected) == (1, 0)
        assert (loser.outbox.counts.acknowledged, loser.outbox.counts.rejected) == (0, 1)
        assert loser.status()["rejected"] == 1
        (rejected,) = await loser.outbox.rejected_documents()
        assert (rejected["doc_type"], rejected["code"]) == ("item_edit", "edit_conflict")
        won, lost = winner.settings.register_id, loser.settings.register_id

        conflicts = await cat.pool.fetch("SELECT * FROM catalog_conflicts")
        assert len(conflicts) == 1
        conflict = conflicts[0]
        assert (conflict["code"], conflict["register_id"], conflict["seq"]) == (
            "edit_conflict",
            lost,
            rejected["seq"],
        )
        assert (conflict["scope"], conflict["key"]) == ("global", "i-7")
        assert (conflict["base_version"], conflict["current_version"]) == (1, 2)
        assert json.loads(conflict["proposed"])["name"] == f"Edited on {lost}"

        final = None
        for s in settings:
            rows = await wait_converged(cat, s)
            assert final in (None, rows[("items", "i-7", "global")])
            final = rows[("items", "i-7", "global")]
        assert final is not None
        assert final[0] == 2
        assert (final[2]["name"], final[2]["gross_price"]) == (
            f"Edited on {won}",
            111 if winner is one else 222,
        )
        changed_by = await cat.pool.fetchval(
            "SELECT changed_by FROM catalog_changelog WHERE scope = 'global' AND key = 'i-7'"
            " ORDER BY scope_seq DESC LIMIT 1"
        )
        assert changed_by == f"register:{won}"
    triggers = [r["detail"].get("trigger") for r in catalog_runs(loser.settings)]
    assert "edit_conflict" in triggers


async def test_import_reports_bad_rows_and_the_good_ones_reach_a_register(
    cat: Central, tmp_path: Path
) -> None:
    """``tillsync-central catalog import`` lists each bad row by line with its code, field
    and reason and exits 1; the good rows reach a running register; a re-import writes
    nothing."""
    enrollment = await cat.provision(CENTER, reg("r-imp"))
    await seed(cat, items=3)
    settings = fast_settings(enrollment, tmp_path / "data")
    csv_file = tmp_path / "items.csv"
    csv_file.write_text(
        "key,name,gross_price,currency,tax_rate_id,barcodes,labels\n"
        "imp-1,Chléb,4990,CZK,vat-21,8591;8592,\n"
        "imp-2,Máslo,12.50,CZK,vat-21,,\n"
        "imp-3,,1000,CZK,vat-21,,\n"
        f"{'k' * 65},Sůl,1000,CZK,vat-21,,\n"
        "imp-5,Cukr,1000,czk,vat-21,,\n"
        "imp-6,Mouka,2590,CZK,vat-21,,bar\n",
        encoding="utf-8",
    )
    async with running_agents([settings]) as (agent,):
        await wait_converged(cat, settings)
        code, out, err = await central_cli(
            cat, "catalog", "import", str(csv_file), "--entity", "items"
        )
        assert code == 1, out + err
        assert "6 rows read: 2 good (2 changed, 0 unchanged), 4 bad" in out
        table = {row[0]: row[1:] for row in table_rows(err)}
        assert table == {
            "3": ["float_not_allowed", "state.gross_price", table["3"][2]],
            "4": ["missing_field", "state.name", table["4"][2]],
            "5": ["invalid_value", "key", table["5"][2]],
            "6": ["invalid_value", "state.currency", table["6"][2]],
        }, err
        assert "12.50" in table["3"][2]
        rows = await wait_converged(cat, settings)
        assert {k for e, k, _ in rows if e == "items"} == {"i-0", "i-1", "i-2", "imp-1", "imp-6"}
        scanned = await agent.replica.item_by_barcode("8592")
        assert scanned is not None
        assert scanned.key == "imp-1"
        # Importing the same file again publishes nothing.
        seqs = await last_seqs(cat, CENTER)
        code, out, _ = await central_cli(
            cat, "catalog", "import", str(csv_file), "--entity", "items"
        )
        assert "2 good (0 changed, 2 unchanged)" in out
        assert await last_seqs(cat, CENTER) == seqs


async def test_bad_delta_requests_get_a_clear_refusal(cat: Central, tmp_path: Path) -> None:
    """Requests central must refuse, each answered with ``delta_end.error_code`` to the
    register the broker vouched for and kept as a dead letter; and a real agent whose
    cursors are ahead of central (a replica from another central) recovers by itself."""
    raw = await cat.provision(CENTER, reg("r-raw"))
    other = await cat.provision(CENTER, reg("r-other"))
    await cat.provision(OTHER, reg("s-far"))
    await seed(cat, items=5)
    last = (await last_seqs(cat, CENTER))["global"]
    async with Requester(raw) as requester:
        ahead = await requester.ask(cursors={"global": last + 5, CENTER: 0})
        mismatch = await requester.ask(register_id=other.register_id)
        foreign = await requester.ask(cursors={"global": 0, OTHER: 0})
    for answer, code, field in (
        (ahead, "cursor_ahead", "body.cursors.global"),
        (mismatch, "identity_mismatch", "body.register_id"),
        (foreign, "unknown_scope", f"body.cursors.{OTHER}"),
    ):
        end = answer.end.body
        assert (end.error_code, end.pages, end.changes, answer.pages) == (code, 0, 0, [])
        assert end.error_reason
        letter = await cat.pool.fetchrow(
            "SELECT field, user_id FROM dead_letters WHERE source = 'rpc' AND code = $1", code
        )
        assert letter is not None
        assert (letter["field"], letter["user_id"]) == (field, raw.broker_user)
    assert ahead.end.body.cursors == {"global": last + 5, CENTER: 0}
    assert "reinit" in (ahead.end.body.error_reason or "")

    enrollment = await cat.provision(CENTER, reg("r-ahead"))
    settings = fast_settings(enrollment, tmp_path)
    async with running_agents([settings]):
        await wait_converged(cat, settings)
    set_cursors(settings, {"global": last + 1000, CENTER: 50})
    tamper(settings, {("items", "elsewhere", "global"): (1, last + 1000, item("Elsewhere"))})
    runs = len(catalog_runs(settings))
    async with running_agents([settings]):
        await wait_idle(settings, more_than=runs + 1)  # the refused delta, then a replace
        rows = await wait_converged(cat, settings)
    assert ("items", "elsewhere", "global") not in rows
    failed, recovered = catalog_runs(settings)[-2:]
    assert (failed["kind"], failed["result"]) == ("catalog_delta", "failed")
    assert "cursor" in failed["errors"][0]
    assert (recovered["kind"], recovered["result"]) == ("reinit", "successful")
    assert recovered["detail"]["trigger"] == "cursor_ahead"
