"""What ``deploy/`` ships: the systemd units (and ``systemd-analyze verify`` where it
exists), the compose file (parsed: it cannot run here, there is no Docker engine) and
the RabbitMQ operator policies, applied to the real broker."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from tills import until

from conftest import Enroll
from tillsync_central.management import Management
from tillsync_protocol import topology

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
BIN = Path(sys.executable).parent
UNITS = ["tillsync-agent.service", "tillsync-central.service", "tillsync-central@.service"]
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "RestrictSUIDSGID": "yes",
    "SystemCallArchitectures": "native",
}


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``key -> values`` of a unit file (keys may repeat: SystemCallFilter, Environment)."""
    values: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key, []).append(value)
    return values


@pytest.mark.parametrize("name", UNITS)
def test_units_notify_watch_restart_and_harden(name: str) -> None:
    unit = unit_settings(DEPLOY / "systemd" / name)
    assert unit["Type"] == ["notify"]
    assert unit["WatchdogSec"] == ["30"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"] == ["tillsync"]
    assert unit["Environment"].count("TILLSYNC_LOG_FORMAT=json") == 1
    for key, value in HARDENING.items():
        assert unit.get(key) == [value], key
    [exec_start] = unit["ExecStart"]
    assert exec_start.split()[1] == "run"
    assert "--config" in exec_start


def test_agent_unit_owns_its_state_directory() -> None:
    unit = unit_settings(DEPLOY / "systemd" / "tillsync-agent.service")
    assert unit["StateDirectory"] == ["tillsync-agent"]
    assert unit["ReadWritePaths"] == ["/var/lib/tillsync-agent"]
    assert "TILLSYNC_DATA_DIR=/var/lib/tillsync-agent" in unit["Environment"]


def test_agent_unit_lets_the_sqlite_thread_take_sched_batch() -> None:
    """The units deny ``@resources``; the agent's allows ``sched_setscheduler`` back after
    that (an assignment adds to or takes from the list in order), or its SQLite thread's
    ``SCHED_BATCH`` would fail with EPERM under the unit; realtime policies stay refused."""
    unit = unit_settings(DEPLOY / "systemd" / "tillsync-agent.service")
    filters = [value.split() for value in unit["SystemCallFilter"]]
    denied = next(i for i, names in enumerate(filters) if "@resources" in names)
    assert filters[denied][0].startswith("~")
    assert ["sched_setscheduler"] in filters[denied + 1 :]
    assert unit["RestrictRealtime"] == ["yes"]
    assert unit["SystemCallErrorNumber"] == ["EPERM"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_sched_setscheduler_is_one_of_the_resources_calls_the_units_deny() -> None:
    """Why the agent's unit needs the line: systemd's own list of ``@resources``."""
    listed = subprocess.run(
        ["systemd-analyze", "syscall-filter", "@resources"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    assert "sched_setscheduler" in listed


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    for name in UNITS:
        # The units name /opt/tillsync/bin/…: point them at this checkout's scripts.
        text = (DEPLOY / "systemd" / name).read_text().replace("/opt/tillsync/bin/", f"{BIN}/")
        target = tmp_path / name.replace("@.", "@1.")
        target.write_text(text)
        result = subprocess.run(
            ["systemd-analyze", "verify", str(target)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr.strip() == "", result.stderr


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def test_compose_file_parses_and_binds_to_localhost_only() -> None:
    compose = load_yaml(DEPLOY / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"rabbitmq", "postgres", "central"}
    assert services["rabbitmq"]["image"] == "rabbitmq:3.10-management"
    assert services["postgres"]["image"] == "postgres:15"
    published = [port for service in services.values() for port in service.get("ports", [])]
    assert published
    for port in published:
        assert str(port).startswith("127.0.0.1:"), port
    # Files it mounts and builds from exist; secrets come from the environment.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume
    build = services["central"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    central_env = services["central"]["environment"]
    for key in ("TILLSYNC_AMQP_URL", "TILLSYNC_DATABASE_URL", "TILLSYNC_RABBITMQ_API_URL"):
        assert "${" in central_env[key], key
    assert services["central"]["depends_on"] == {
        "rabbitmq": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    plugins = (DEPLOY / "compose" / "enabled_plugins").read_text()
    for plugin in ("rabbitmq_management", "rabbitmq_prometheus"):
        assert plugin in plugins


def operator_policies() -> list[dict[str, Any]]:
    policies: list[dict[str, Any]] = json.loads(
        (DEPLOY / "rabbitmq" / "policies.json").read_text()
    )["operator_policies"]
    return policies


def test_policies_repeat_the_protocol_limits() -> None:
    by_name = {p["name"]: p["definition"] for p in operator_policies()}
    assert by_name["tillsync-delivery-limit"] == {"delivery-limit": topology.INGEST_DELIVERY_LIMIT}
    assert by_name["tillsync-register-queues"] == {"max-length": topology.REGISTER_QUEUE_MAX_LENGTH}
    [presence] = [q for q in topology.queues() if q.name == topology.PRESENCE_QUEUE]
    assert by_name["tillsync-presence"] == {
        "max-length": presence.arguments["x-max-length"],
        "message-ttl": presence.arguments["x-message-ttl"],
    }


async def test_the_broker_accepts_the_policies_and_they_reach_the_queues(
    enroll: Enroll, management: Management
) -> None:
    enrollment = await enroll()
    client = management._client
    vhost = quote(management.vhost, safe="")
    for policy in operator_policies():
        body = {k: v for k, v in policy.items() if k != "name"}
        response = await client.put(f"/api/operator-policies/{vhost}/{policy['name']}", json=body)
        assert response.status_code in (201, 204), response.text

    expected = {
        topology.INGEST_QUEUE: "tillsync-delivery-limit",
        topology.RPC_QUEUE: "tillsync-delivery-limit",
        topology.PRESENCE_QUEUE: "tillsync-presence",
        topology.register_queue(enrollment.register_id): "tillsync-register-queues",
    }

    async def applied() -> bool:
        for queue, name in expected.items():
            info = (await client.get(f"/api/queues/{vhost}/{quote(queue, safe='')}")).json()
            if info.get("operator_policy") != name:
                return False
        return True

    await until(applied, timeout=30)
    ingest = (await client.get(f"/api/queues/{vhost}/{topology.INGEST_QUEUE}")).json()
    # The arguments stand: the policy repeats them, it does not replace them.
    assert ingest["arguments"]["x-delivery-limit"] == topology.INGEST_DELIVERY_LIMIT
    assert ingest["effective_policy_definition"]["delivery-limit"] == 5
