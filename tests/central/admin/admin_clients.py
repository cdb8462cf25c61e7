"""Helpers of the admin API tests: operators' password, logging in over HTTP (bearer
and the dashboard's form), and the clients of each role."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from tillsync_central.admin.pages import LOGIN_CSRF_COOKIE, LOGIN_CSRF_FIELD

PASSWORD = "correct horse battery"
ROLES = ("viewer", "supervisor", "administrator")


@dataclass
class Clients:
    """One logged-in bearer client per role, and one anonymous client."""

    viewer: httpx.AsyncClient
    supervisor: httpx.AsyncClient
    administrator: httpx.AsyncClient
    anonymous: httpx.AsyncClient

    def of(self, role: str) -> httpx.AsyncClient:
        client: httpx.AsyncClient = getattr(self, role)
        return client


async def login(base_url: str, username: str, password: str = PASSWORD) -> httpx.AsyncClient:
    client = httpx.AsyncClient(base_url=base_url, timeout=30)
    response = await client.post("/api/sessions", json={"username": username, "password": password})
    assert response.status_code == 201, response.text
    client.headers["Authorization"] = f"Bearer {response.json()['token']}"
    return client


async def form_login(
    browser: httpx.AsyncClient, username: str, password: str = PASSWORD, next_page: str = "/fleet"
) -> httpx.Response:
    """Log in as a browser does: open the form (its login CSRF cookie), then post it."""
    form = await browser.get("/login")
    assert form.status_code == 200
    token = browser.cookies[LOGIN_CSRF_COOKIE]
    assert f'name="{LOGIN_CSRF_FIELD}" value="{token}"' in form.text
    data = {"username": username, "password": password, "next": next_page, LOGIN_CSRF_FIELD: token}
    return await browser.post("/login", data=data)
