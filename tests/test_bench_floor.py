"""``bench/upward_floor.py`` runs as the plain command its README gives, against the real
services, and its invariant holds: every document stored once and acknowledged once.

Its timings are reported, never asserted (they depend on the machine)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import httpx
import pytest

from services import RabbitApi, Services

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("per_message", [[], ["--one-per-message"]], ids=["batched", "single"])
async def test_the_floor_stores_and_acknowledges_every_document_once(
    services: Services, rabbitmq_api: RabbitApi, per_message: list[str]
) -> None:
    env = {
        **os.environ,
        "TILLSYNC_AMQP_URL": services.amqp_url,
        "TILLSYNC_DATABASE_URL": services.database_url,
        "TILLSYNC_RABBITMQ_API_URL": services.rabbitmq_api_url,
    }
    command = [sys.executable, "bench/upward_floor.py", "--rate", "300", "--seconds", "1"]
    done = await asyncio.to_thread(
        subprocess.run,
        [*command, "--registers", "3", "--json-only", *per_message],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    result = json.loads(done.stdout)
    assert result["valid"] is True, result
    assert result["documents"] == 300
    assert result["stored"] == 300
    assert result["acks_received"] == 300
    assert result["submit_to_ack"]["count"] == 300
    assert result["batch"] is (not per_message)
    # Its sandbox (vhost and database) is gone.
    conn = await asyncpg.connect(services.database_url)
    try:
        left = await conn.fetchval(
            "SELECT count(*) FROM pg_database WHERE datname = $1", result["sandbox"]
        )
    finally:
        await conn.close()
    assert left == 0
    async with httpx.AsyncClient(base_url=rabbitmq_api.base_url, auth=rabbitmq_api.auth) as api:
        vhost = await api.get(f"/api/vhosts/{result['sandbox']}")
    assert vhost.status_code == 404
