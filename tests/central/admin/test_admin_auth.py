"""Operators, sessions, roles, CSRF and the audit log of the admin API, against the real
app, PostgreSQL and RabbitMQ. The role checks walk the endpoint table: a new write
endpoint is covered (and fails here if it lets a viewer through) without editing a test."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from tillsync_central.admin import AdminServer, add_operator
from tillsync_central.admin.auth import Endpoint
from tillsync_central.admin.endpoints import ENDPOINTS
from tillsync_central.admin.operators import role_allows
from tillsync_central.admin.pages import LOGIN_CSRF_FIELD
from tillsync_central.admin.sessions import COOKIE_NAME, csrf_token
from tillsync_central.admin.throttle import LoginThrottle
from tillsync_central.settings import CentralSettings

from .admin_clients import PASSWORD, Clients, form_login, login

WRITES = [e for e in ENDPOINTS if e.writes]
GUARDED = [e for e in ENDPOINTS if e.role is not None]


def concrete(path: str) -> str:
    """A real path for a template: every {param} becomes a plausible value."""
    values = {"seq": "1", "letter_id": "1", "conflict_id": "1", "scope": "global",
              "entity": "items", "key": "k1", "register_id": "r1"}  # fmt: skip
    return re.sub(r"\{([^}]+)\}", lambda m: values[m.group(1)], path)


def ids(endpoint: Endpoint) -> str:
    return f"{endpoint.method} {endpoint.path}"


def test_every_write_names_its_role_and_audit_action() -> None:
    # Only logging in is open, only logging out is a viewer's write: everything else that
    # changes something needs a supervisor at least, and is audited under a name.
    for endpoint in WRITES:
        assert endpoint.action, f"{ids(endpoint)} writes but has no audit action"
        if endpoint.action == "login":
            assert endpoint.role is None
        elif endpoint.action == "logout":
            assert endpoint.role == "viewer"
        else:
            assert endpoint.role in ("supervisor", "administrator"), ids(endpoint)
    assert {e.action for e in WRITES} >= {"catalog.upsert", "dead_letter.replay", "command.reinit"}


@pytest.mark.parametrize("endpoint", [e for e in WRITES if e.role not in (None, "viewer")], ids=ids)
async def test_a_viewer_may_not_write(
    endpoint: Endpoint, clients: Clients, pool: asyncpg.Pool
) -> None:
    audit_before = await pool.fetchval("SELECT count(*) FROM audit_log")
    response = await clients.viewer.request(
        endpoint.method, concrete(endpoint.path), json={"state": {}, "mode": "update"}
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "forbidden"
    assert response.json()["error"]["field"] == "role"
    # Nothing was done: no audit row, no catalog change.
    assert await pool.fetchval("SELECT count(*) FROM audit_log") == audit_before
    assert await pool.fetchval("SELECT count(*) FROM catalog_changelog") == 0


@pytest.mark.parametrize("endpoint", GUARDED, ids=ids)
async def test_every_guarded_endpoint_refuses_anonymous_and_lower_roles(
    endpoint: Endpoint, clients: Clients
) -> None:
    path = concrete(endpoint.path)
    response = await clients.anonymous.request(endpoint.method, path)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == {
        "code": "unauthorized",
        "field": "Authorization",
        "reason": response.json()["error"]["reason"],
    }
    for role in ("viewer", "supervisor"):
        assert endpoint.role is not None
        if role_allows(role, endpoint.role) or endpoint.path == "/api/events":
            continue
        refused = await clients.of(role).request(endpoint.method, path, json={})
        assert refused.status_code == 403, (role, refused.text)
        assert refused.json()["error"]["code"] == "forbidden"


async def test_login_failures_are_uniform(clients: Clients, pool: asyncpg.Pool) -> None:
    for username, password in (("op-viewer", "wrong password"), ("nobody", PASSWORD)):
        response = await clients.anonymous.post(
            "/api/sessions", json={"username": username, "password": password}
        )
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "login_failed"
    missing = await clients.anonymous.post("/api/sessions", json={"username": "op-viewer"})
    assert missing.status_code == 422
    assert missing.json()["error"]["field"] == "password"
    bad_json = await clients.anonymous.post("/api/sessions", content=b"{nope")
    assert bad_json.status_code == 400
    assert bad_json.json()["error"]["code"] == "malformed"


async def test_passwords_and_tokens_are_hashed_at_rest(
    clients: Clients, pool: asyncpg.Pool
) -> None:
    rows = await pool.fetch("SELECT password_salt, password_hash FROM operators")
    assert len(rows) == 3
    assert len({bytes(r["password_salt"]) for r in rows}) == 3  # a salt per operator
    assert len({bytes(r["password_hash"]) for r in rows}) == 3  # same password, other hashes
    assert all(PASSWORD.encode() not in bytes(r["password_hash"]) for r in rows)
    token = clients.viewer.headers["Authorization"].split()[1]
    stored = await pool.fetch("SELECT token_hash FROM operator_sessions")
    assert all(token.encode() not in bytes(r["token_hash"]) for r in stored)
    # Logging out ends the token.
    assert (await clients.viewer.delete("/api/sessions/current")).status_code == 200
    assert (await clients.viewer.get("/api/me")).status_code == 401


async def test_an_expired_session_is_refused(clients: Clients, pool: asyncpg.Pool) -> None:
    assert (await clients.supervisor.get("/api/me")).json()["role"] == "supervisor"
    await pool.execute("UPDATE operator_sessions SET expires_at = now() - interval '1 second'")
    response = await clients.supervisor.get("/api/me")
    assert response.status_code == 401


async def test_cookie_sessions_need_the_csrf_token_for_writes(
    admin: AdminServer, clients: Clients, pool: asyncpg.Pool
) -> None:
    async with httpx.AsyncClient(base_url=admin.url, timeout=30) as browser:
        page = await form_login(browser, "op-supervisor")
        assert page.status_code == 303
        assert page.headers["location"] == "/fleet"
        cookie = page.headers["set-cookie"]
        assert f"{COOKIE_NAME}=" in cookie
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        token = browser.cookies[COOKIE_NAME]
        fleet = await browser.get("/fleet")
        assert fleet.status_code == 200
        assert f'name="csrf-token" content="{csrf_token(token)}"' in fleet.text

        state = {"name": "Bread", "gross_price": 2500, "currency": "CZK", "tax_rate_id": "vat-12"}
        path = "/api/catalog/global/items/bread"
        refused = await browser.put(path, json={"state": state})
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "csrf_failed"
        forged = await browser.put(path, json={"state": state}, headers={"X-CSRF-Token": "0" * 64})
        assert forged.json()["error"]["code"] == "csrf_failed"
        assert await pool.fetchval("SELECT count(*) FROM catalog_changelog") == 0

        done = await browser.put(
            path, json={"state": state}, headers={"X-CSRF-Token": csrf_token(token)}
        )
        assert done.status_code == 200, done.text
        assert done.json()["version"] == 1
    rows = await pool.fetch("SELECT username, action, target, details FROM audit_log ORDER BY id")
    assert [(r["username"], r["action"]) for r in rows][-2:] == [
        ("op-supervisor", "login"),
        ("op-supervisor", "catalog.upsert"),
    ]
    assert rows[-1]["target"] == "global/items/bread"
    assert rows[-1]["details"]["state"]["gross_price"] == 2500
    changed_by = await pool.fetchval("SELECT changed_by FROM catalog_changelog")
    assert changed_by == "admin:op-supervisor"


async def test_the_login_page_never_redirects_off_site(
    admin: AdminServer, pool: asyncpg.Pool
) -> None:
    await add_operator(pool, "op-x", "viewer", PASSWORD)
    async with httpx.AsyncClient(base_url=admin.url, timeout=30) as browser:
        assert (await browser.get("/fleet")).headers["location"] == "/login?next=/fleet"
        page = await form_login(browser, "op-x", next_page="//evil.example/")
        assert page.headers["location"] == "/fleet"
    async with httpx.AsyncClient(base_url=admin.url, timeout=30) as browser:
        wrong = await form_login(browser, "op-x", "nope")
        assert wrong.status_code == 401
        assert 'data-testid="login-error"' in wrong.text


async def test_a_login_form_posted_from_another_site_is_refused(
    admin: AdminServer, pool: asyncpg.Pool
) -> None:
    """Login CSRF: a page elsewhere cannot log a browser in (as the attacker) by posting
    the form; the browser sends no SameSite=Strict cookie with it."""
    await add_operator(pool, "op-y", "viewer", PASSWORD)
    credentials = {"username": "op-y", "password": PASSWORD, "next": "/fleet"}
    async with httpx.AsyncClient(base_url=admin.url, timeout=30) as browser:
        bare = await browser.post("/login", data=credentials)
        # A token of the attacker's own, without the cookie that matches it.
        forged = await browser.post("/login", data={**credentials, LOGIN_CSRF_FIELD: "x" * 43})
        for refused in (bare, forged):
            assert refused.status_code == 403
            assert "expired or came from another site" in refused.text
            assert COOKIE_NAME not in refused.cookies
    async with httpx.AsyncClient(base_url=admin.url, timeout=30) as browser:
        await browser.get("/login")
        # The cookie of this browser's form, but another value in the field.
        mismatch = await browser.post("/login", data={**credentials, LOGIN_CSRF_FIELD: "é" * 43})
        assert mismatch.status_code == 403
    assert await pool.fetchval("SELECT count(*) FROM operator_sessions") == 0
    assert await pool.fetchval("SELECT count(*) FROM audit_log WHERE action = 'login'") == 0
    # A refused form is no failed password: the operator is not slowed down.
    async with httpx.AsyncClient(base_url=admin.url, timeout=30) as browser:
        assert (await form_login(browser, "op-y")).status_code == 303


async def test_operators_are_managed_by_administrators_and_audited(
    clients: Clients, pool: asyncpg.Pool
) -> None:
    body = {"username": "op-new", "role": "supervisor", "password": "another password"}
    assert (await clients.supervisor.post("/api/operators", json=body)).status_code == 403
    created = await clients.administrator.post("/api/operators", json=body)
    assert created.status_code == 201, created.text
    again = await clients.administrator.post("/api/operators", json=body)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "operator_exists"
    bad_role = await clients.administrator.post(
        "/api/operators", json={**body, "username": "op-b", "role": "root"}
    )
    assert bad_role.status_code == 422
    assert bad_role.json()["error"]["field"] == "role"
    short = await clients.administrator.post(
        "/api/operators", json={**body, "username": "op-c", "password": "short"}
    )
    assert short.json()["error"]["field"] == "password"
    listed = (await clients.administrator.get("/api/operators")).json()["operators"]
    assert [o["username"] for o in listed] == [
        "op-administrator",
        "op-new",
        "op-supervisor",
        "op-viewer",
    ]
    audit = (await clients.administrator.get("/api/audit")).json()["entries"]
    assert audit[0]["action"] == "operator.add"
    assert audit[0]["username"] == "op-administrator"
    assert audit[0]["target"] == "operator:op-new"
    assert await pool.fetchval("SELECT count(*) FROM audit_log WHERE action = 'operator.add'") == 1
    new = await login(str(clients.administrator.base_url), "op-new", "another password")
    assert (await new.get("/api/me")).json()["role"] == "supervisor"
    await new.aclose()


def test_users_cli_adds_and_lists_operators(
    admin_settings: CentralSettings, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "TILLSYNC_AMQP_URL": admin_settings.amqp_url.get_secret_value(),
        "TILLSYNC_DATABASE_URL": admin_settings.database_url.get_secret_value(),
        "TILLSYNC_RABBITMQ_API_URL": admin_settings.rabbitmq_api_url.get_secret_value(),
    }
    env.pop("TILLSYNC_OPERATOR_PASSWORD", None)
    binary = str(Path(sys.executable).parent / "tillsync-central")
    secret = tmp_path / "password"
    secret.write_text("a long enough secret\n")
    added = subprocess.run(
        [binary, "users", "add", "boss", "--role", "administrator", "--password-file", str(secret)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert "added boss (administrator)" in added.stdout
    again = subprocess.run(
        [binary, "users", "add", "boss", "--role", "viewer"],
        env={**env, "TILLSYNC_OPERATOR_PASSWORD": "a long enough secret"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert again.returncode == 1
    assert "code=operator_exists" in again.stderr
    listed = subprocess.run(
        [binary, "users", "list", "--json"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert '"username": "boss"' in listed.stdout
    assert '"role": "administrator"' in listed.stdout
    assert "a long enough secret" not in added.stdout + added.stderr + listed.stdout


async def test_repeated_failed_logins_are_slowed_down_per_username(clients: Clients) -> None:
    async def log_in(username: str, password: str) -> httpx.Response:
        return await clients.anonymous.post(
            "/api/sessions", json={"username": username, "password": password}
        )

    for _ in range(5):
        assert (await log_in("op-viewer", "wrong password")).status_code == 401
    # Now even the right password is not checked until the wait is over.
    throttled = await log_in("op-viewer", PASSWORD)
    assert throttled.status_code == 429
    assert throttled.json()["error"]["code"] == "too_many_attempts"
    assert throttled.json()["error"]["field"] == "username"
    # Other operators are not affected.
    assert (await log_in("op-supervisor", PASSWORD)).status_code == 201
    await asyncio.sleep(1.1)  # the first wait is 1 s
    assert (await log_in("op-viewer", PASSWORD)).status_code == 201
    # A success forgets the failures: one more wrong password is a plain 401.
    assert (await log_in("op-viewer", "wrong password")).status_code == 401
    assert (await log_in("op-viewer", PASSWORD)).status_code == 201


def test_the_login_wait_doubles_and_is_capped() -> None:
    now = [1000.0]
    throttle = LoginThrottle(free=2, base_s=1.0, cap_s=8.0, clock=lambda: now[0])
    throttle.failed("Ann")
    throttle.failed("ann")
    assert throttle.wait_s("ANN") == 1.0
    waits = []
    for _ in range(5):
        throttle.failed("ann")
        waits.append(throttle.wait_s("ann"))
    assert waits == [2.0, 4.0, 8.0, 8.0, 8.0]
    now[0] += 8.0
    assert throttle.wait_s("ann") == 0.0
    throttle.succeeded("ann")
    throttle.failed("ann")
    assert throttle.wait_s("ann") == 0.0


async def test_a_page_beyond_the_role_says_so_in_html(
    admin: AdminServer, pool: asyncpg.Pool
) -> None:
    await add_operator(pool, "op-v", "viewer", PASSWORD)
    async with httpx.AsyncClient(base_url=admin.url, timeout=30) as browser:
        assert (await form_login(browser, "op-v")).status_code == 303
        page = await browser.get("/operators")
        assert page.status_code == 403
        assert page.headers["content-type"].startswith("text/html")
        assert 'data-testid="forbidden"' in page.text
        assert "needs the <strong>administrator</strong> role" in page.text
        assert 'data-testid="nav"' in page.text  # the rest of the dashboard is a click away
        assert 'data-testid="nav-operators"' not in page.text
        # The JSON API keeps answering clients in JSON.
        api = await browser.get("/api/operators")
        assert api.status_code == 403
        assert api.json()["error"]["code"] == "forbidden"
