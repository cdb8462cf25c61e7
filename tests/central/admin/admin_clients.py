"""Helpers of the admin API tests: operators' password, logging in over HTTP, and the
clients of each role."""

from __future__ import annotations

from dataclasses import dataclass

import httpx

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
