"""The dashboard in a real browser (Debian's Chromium, headless, through Playwright) against
a real ``tillsync-central run`` and real register agents: log in, a register going offline
with its pending count risen, a receipt appearing live, a dead letter replayed, a price
changed in the catalog page reaching a register's replica, and a reinit seen complete.
Each page's screenshot is saved to ``docs/img/`` (shown in the README)."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
from playwright.async_api import BrowserContext, Page, expect

from e2e.conftest import agent_settings, running_agent, wait_for
from faults.proxy import FaultProxy
from register_ids import reg
from tillsync_agent.simulator import Till

from .conftest import Dashboard, log_in, screenshot

TIMEOUT_MS = 30_000

# Headless Chromium shows no notification; this stand-in records what the page asks for.
FAKE_NOTIFICATION = """
window.__notifications = [];
window.Notification = function (title, options) { window.__notifications.push(options.body); };
window.Notification.permission = "granted";
window.Notification.requestPermission = async () => "granted";
"""


async def test_log_in_and_see_a_register_go_offline_with_its_pending_count_risen(
    dashboard: Dashboard, context: BrowserContext, tmp_path: Path
) -> None:
    central = dashboard.central
    enrollment = await central.provision("praha-1", reg("till-1"))
    register = enrollment.register_id
    page = await context.new_page()
    await log_in(page)
    await expect(page.get_by_test_id("whoami")).to_contain_text("administrator")
    row = page.get_by_test_id(f"register-{register}")
    await expect(row).to_have_attribute("data-state", "never_seen")

    async with FaultProxy("127.0.0.1", 5672) as proxy:
        settings = agent_settings(
            enrollment,
            tmp_path / "till-1",
            amqp_url=proxy.url_for(enrollment.amqp_url),
            heartbeat_interval_s=1.0,
        )
        async with running_agent(settings) as agent:
            await expect(row).to_have_attribute("data-state", "online", timeout=TIMEOUT_MS)
            await expect(row.get_by_test_id("pending")).to_have_text("0", timeout=TIMEOUT_MS)
            # Central's database holds every document back (a long lock), so none is
            # acknowledged: the register's heartbeats report them pending.
            holder = await asyncpg.connect(central.database_url)
            lock = holder.transaction()
            await lock.start()
            await holder.execute("LOCK TABLE documents IN EXCLUSIVE MODE")
            try:
                till = Till(register)
                for _ in range(5):
                    await agent.submit(*till.next_document())
                assert agent.outbox.counts.pending == 5
                await expect(row.get_by_test_id("pending")).to_have_text("5", timeout=TIMEOUT_MS)
                proxy.cut()  # the till loses the network
                await expect(row).to_have_attribute("data-state", "offline", timeout=TIMEOUT_MS)
                await expect(row.get_by_test_id("pending")).to_have_text("5")
                await expect(row).to_have_class("state-offline")
                await screenshot(page, "fleet")
            finally:
                await lock.rollback()
                await holder.close()
            proxy.heal()
            await expect(row).to_have_attribute("data-state", "online", timeout=TIMEOUT_MS)
            await expect(row.get_by_test_id("pending")).to_have_text("0", timeout=TIMEOUT_MS)
    assert await central.stored(register) == 5

    await page.goto(f"/syncs?register={register}")
    await expect(page.get_by_test_id("sync-row").first).to_be_visible(timeout=TIMEOUT_MS)
    await screenshot(page, "syncs")

    await page.get_by_test_id("logout").click()
    await page.wait_for_url("**/login")
    await page.goto("/fleet")
    await expect(page.get_by_test_id("login-form")).to_be_visible()
    assert await central.pool.fetchval("SELECT count(*) FROM operator_sessions") == 0


async def test_a_new_receipt_appears_live_with_a_notification(
    dashboard: Dashboard, context: BrowserContext, tmp_path: Path
) -> None:
    central = dashboard.central
    enrollment = await central.provision("brno-1", reg("till-2"))
    register = enrollment.register_id
    page = await context.new_page()
    await page.add_init_script(FAKE_NOTIFICATION)
    await log_in(page)
    await page.goto("/live")
    await expect(page.get_by_test_id("live-status")).to_have_text("live", timeout=TIMEOUT_MS)
    await page.wait_for_timeout(1500)  # the feed's first poll sets its starting point
    settings = agent_settings(enrollment, tmp_path / "till-2", heartbeat_interval_s=1.0)
    async with running_agent(settings) as agent:
        till = Till(register, receipts_per_shift=2)
        for _ in range(4):  # the shift opens, two receipts, the shift closes (Z-report)
            await agent.submit(*till.next_document())
        receipt = page.locator(f'[data-testid="event-document"][data-key="{register}/2"]')
        await expect(receipt).to_be_visible(timeout=TIMEOUT_MS)
        await expect(receipt).to_contain_text(f"receipt {register} #2")
        await wait_for(lambda: _stored(central, 4), timeout=30, what="the shift stored")
    notes = await page.evaluate("window.__notifications")
    assert any(f"receipt {register} #2" in note for note in notes), notes
    await screenshot(page, "live")

    await page.goto(f"/documents?register={register}")
    await expect(page.get_by_test_id(f"document-{register}-2")).to_be_visible()
    await expect(page.get_by_test_id("receipt-days")).to_contain_text(register)
    zreport = page.get_by_test_id(f"zreport-{register}-1")
    await expect(zreport).to_contain_text("2 / 2")
    for _ in range(30):  # the reconciler checks closed shifts every second here
        if (await zreport.get_by_test_id("reconciliation").inner_text()).strip() == "ok":
            break
        await page.wait_for_timeout(1000)
        await page.reload()
    await expect(zreport.get_by_test_id("reconciliation")).to_have_text("ok")
    await screenshot(page, "documents")
    await page.get_by_test_id(f"document-{register}-2").get_by_role("link").click()
    decoded = json.loads(await page.get_by_test_id("document-decoded").inner_text())
    assert decoded["type"] == "receipt"
    assert decoded["seq"] == 2
    assert len(await page.get_by_test_id("document-hex").inner_text()) > 100
    await screenshot(page, "document")


async def _stored(central: object, count: int) -> bool:
    return bool(await central.stored() >= count)  # type: ignore[attr-defined]


async def test_replay_a_dead_letter_after_the_fix(
    dashboard: Dashboard, context: BrowserContext, tmp_path: Path
) -> None:
    central = dashboard.central
    enrollment = await central.provision("ostrava-1", reg("till-3"))
    register = enrollment.register_id
    # A mistake at central: the register is moved to a center it is not in.
    await central.pool.execute("INSERT INTO centers (center_id, name) VALUES ('wrong', 'Wrong')")
    await central.pool.execute(
        "UPDATE registers SET center_id = 'wrong' WHERE register_id = $1", register
    )
    settings = agent_settings(enrollment, tmp_path / "till-3", heartbeat_interval_s=3600.0)
    async with running_agent(settings) as agent:
        await agent.submit(*Till(register).next_document())
        await wait_for(
            lambda: _letters(central.pool), timeout=30, what="the document to be dead-lettered"
        )
    letter_id = await central.pool.fetchval(
        "SELECT id FROM dead_letters WHERE source = 'ingest' AND register_id = $1", register
    )
    await central.pool.execute(  # the fix
        "UPDATE registers SET center_id = 'ostrava-1' WHERE register_id = $1", register
    )

    page = await context.new_page()
    await log_in(page)
    await page.get_by_test_id("nav-dead-letters").click()
    await expect(page.get_by_test_id("code-unknown_register")).to_be_visible()
    await expect(page.get_by_test_id(f"dead-letter-{letter_id}")).to_contain_text("new")
    await screenshot(page, "dead-letters")
    await page.get_by_test_id(f"dead-letter-{letter_id}").get_by_role("link").first.click()
    await expect(page.get_by_test_id("dead-letter-code")).to_have_text("unknown_register")
    await expect(page.get_by_test_id("dead-letter-decoded")).to_contain_text("shift_open")
    await expect(page.get_by_test_id("dead-letter-hex")).not_to_be_empty()
    await screenshot(page, "dead-letter")
    await page.get_by_test_id("replay-note").fill("register moved back to ostrava-1")
    await page.get_by_test_id("replay").click()
    await expect(page.get_by_test_id("dead-letter-status")).to_have_text(
        "replayed", timeout=TIMEOUT_MS
    )
    assert await central.stored(register) == 1
    audit = await central.pool.fetchrow(
        "SELECT username, action FROM audit_log WHERE action = 'dead_letter.replay'"
    )
    assert audit is not None
    assert tuple(audit) == ("ops-admin", "dead_letter.replay")


async def _letters(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval("SELECT count(*) FROM dead_letters WHERE source = 'ingest'"))


async def _fill_new_entry(page: Page, scope: str, entity: str, key: str, state: object) -> None:
    await page.goto(f"/catalog?scope={scope}&entity={entity}")
    await page.get_by_test_id("new-key").fill(key)
    await page.get_by_test_id("new-state").fill(json.dumps(state))
    await page.get_by_test_id("create").click()
    await expect(page.get_by_test_id(f"entry-{key}")).to_be_visible(timeout=TIMEOUT_MS)


async def test_a_price_changed_in_the_catalog_page_reaches_the_replica_and_a_reinit_completes(
    dashboard: Dashboard, context: BrowserContext, tmp_path: Path
) -> None:
    central = dashboard.central
    enrollment = await central.provision("plzen-1", reg("till-4"))
    register = enrollment.register_id
    settings = agent_settings(enrollment, tmp_path / "till-4", heartbeat_interval_s=1.0)
    page = await context.new_page()
    await log_in(page)
    async with running_agent(settings) as agent:
        item = {"name": "Rohlík", "gross_price": 390, "currency": "CZK", "tax_rate_id": "vat-12"}
        await _fill_new_entry(page, "global", "items", "rohlik", item)
        await wait_for(lambda: _price(agent, 390), timeout=30, what="the item on the register")
        await _fill_new_entry(
            page, "plzen-1", "prices", "rohlik", {"gross_price": 450, "currency": "CZK"}
        )
        await wait_for(
            lambda: _price(agent, 450), timeout=30, what="the center price on the register"
        )
        # Change it again through the row's own edit form.
        edit = page.get_by_test_id("edit-rohlik")
        await edit.get_by_test_id("edit-state").fill(
            json.dumps({"gross_price": 475, "currency": "CZK"})
        )
        await edit.get_by_test_id("save").click()
        await expect(page.get_by_test_id("entry-rohlik").get_by_test_id("version")).to_have_text(
            "2", timeout=TIMEOUT_MS
        )
        await wait_for(lambda: _price(agent, 475), timeout=30, what="the new price on the register")

        await page.get_by_test_id("reinit-register").fill(register)
        await page.get_by_test_id("reinit-mode").select_option("replace")
        await page.get_by_test_id("reinit-send").click()
        await expect(page.get_by_test_id("reinit-status")).to_contain_text(
            "completed on 1/1", timeout=60_000
        )
        await expect(page.get_by_test_id("reinit-status")).to_contain_text(
            f"{register}: successful"
        )
        await _wait_price(agent, 475)
        await screenshot(page, "catalog")

        await page.goto("/queues")
        ingest = page.get_by_test_id("queue-tillsync.ingest")
        await expect(ingest.get_by_test_id("consumers")).not_to_have_text("0", timeout=TIMEOUT_MS)
        await screenshot(page, "queues")
    await page.goto("/operators")
    await expect(page.get_by_test_id("audit-row").first).to_contain_text("command.reinit")
    await screenshot(page, "operators")
    actions = [r["action"] for r in await central.pool.fetch("SELECT action FROM audit_log")]
    assert actions.count("catalog.upsert") == 3
    assert actions.count("command.reinit") == 1


async def _price(agent: object, amount: int) -> bool:
    price = await agent.replica.price("rohlik")  # type: ignore[attr-defined]
    return price is not None and price.gross_price == amount


async def _wait_price(agent: object, amount: int) -> None:
    await wait_for(lambda: _price(agent, amount), timeout=30, what=f"price {amount} after reinit")
