"""What ``deploy/`` ships for monitoring: the Grafana dashboard, the Prometheus scrape
configuration and its alert rules. Every metric they query exists in a real scrape — of
central's registry over a real database, and of the real broker's Prometheus plugin on the
paths ``prometheus.yml`` scrapes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import yaml
from scrape import Scrape

from services import Services
from tillsync_central.metrics import build_registry, metrics_app
from tillsync_central.runner import CentralService
from tillsync_central.settings import CentralSettings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "tillsync.json"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "tillsync-alerts.yml"
RABBITMQ_PROMETHEUS_PORT = 15692

_METRIC = re.compile(r"\b((?:tillsync|rabbitmq|process)_[a-z0-9_]+)\b")
# Names Prometheus makes up itself, not any exporter's.
_SYNTHETIC = {"up"}
_PANEL_TYPES = {"row", "stat", "timeseries"}


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return found


def dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel.get("targets", [])]


def alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [str(rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def metric_names(exprs: list[str], prefix: str) -> set[str]:
    return {name for expr in exprs for name in _METRIC.findall(expr) if name.startswith(prefix)}


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    board = dashboard()
    assert board["uid"] == "tillsync-central"
    assert board["title"]
    assert isinstance(board["schemaVersion"], int)
    assert board["schemaVersion"] >= 36
    assert board["id"] is None  # importable into any Grafana
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels():
        assert panel["type"] in _PANEL_TYPES, panel["type"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["w"] >= 1
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [target["refId"] for target in panel["targets"]]
        assert refs
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            for used in re.findall(r"\$(\w+)", target["expr"]):
                assert used in variables or used.startswith("__"), used


def test_prometheus_config_scrapes_central_and_rabbitmq() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"tillsync-central", "rabbitmq", "rabbitmq-queues"}
    assert jobs["tillsync-central"].get("metrics_path", "/metrics") == "/metrics"
    for name in ("rabbitmq", "rabbitmq-queues"):
        [targets] = [c["targets"] for c in jobs[name]["static_configs"]]
        assert all(t.endswith(f":{RABBITMQ_PROMETHEUS_PORT}") for t in targets)
    assert config["rule_files"] == [ALERTS.name]
    # The dashboard's job selectors name jobs that exist.
    for expr in dashboard_exprs() + alert_exprs():
        for job in re.findall(r'job="([^"]+)"', expr):
            assert job in jobs, job


def test_grafana_provisioning_points_at_the_dashboard_and_prometheus() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "tillsync.yaml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"
    assert provider["options"]["path"]
    [source] = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus"
    assert source["isDefault"] is True


def test_compose_serves_central_metrics_and_the_rabbitmq_plugin() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    central = compose["services"]["central"]
    port = central["environment"]["TILLSYNC_METRICS_PORT"]
    assert central["environment"]["TILLSYNC_METRICS_HOST"] == "0.0.0.0"
    assert f"127.0.0.1:{port}:{port}" in central["ports"]
    rabbitmq = compose["services"]["rabbitmq"]
    assert f"127.0.0.1:{RABBITMQ_PROMETHEUS_PORT}:{RABBITMQ_PROMETHEUS_PORT}" in rabbitmq["ports"]
    plugins = (DEPLOY / "compose" / "enabled_plugins").read_text()
    assert "rabbitmq_prometheus" in plugins


async def test_every_tillsync_metric_queried_exists_in_a_real_scrape(
    settings: CentralSettings, pool: asyncpg.Pool
) -> None:
    service = CentralService(settings, pool)
    app = metrics_app(build_registry(pool, settings, service=service))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://central") as client:
        response = await client.get("/metrics")
    scrape = Scrape.parse(response.text)
    assert scrape.value("tillsync_metrics_db_up") == 1
    queried = metric_names(dashboard_exprs() + alert_exprs(), "tillsync_") | metric_names(
        dashboard_exprs(), "process_"
    )
    assert len(queried) >= 30
    missing = queried - scrape.names()
    assert not missing, f"queried but never exposed: {sorted(missing)}"
    # And the other way round: every tillsync metric central exposes is on the dashboard.
    exposed = {
        name
        for name in scrape.families
        if name.startswith("tillsync_") and not name.endswith("_created")  # creation times
    }
    shown = {family_of(name) for name in metric_names(dashboard_exprs(), "tillsync_")}
    assert exposed - shown == set(), f"not on the dashboard: {sorted(exposed - shown)}"


def family_of(name: str) -> str:
    """The family a sample name belongs to (a counter's `x_total` is family `x`)."""
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


async def test_every_rabbitmq_metric_queried_exists_in_the_brokers_scrape(
    services: Services, declared: None
) -> None:
    host = urlsplit(services.rabbitmq_api_url).hostname
    config = yaml.safe_load(PROMETHEUS.read_text())
    names: set[str] = set()
    async with httpx.AsyncClient(timeout=30) as client:
        for job in config["scrape_configs"]:
            if not job["job_name"].startswith("rabbitmq"):
                continue
            url = f"http://{host}:{RABBITMQ_PROMETHEUS_PORT}{job.get('metrics_path', '/metrics')}"
            response = await client.get(url, params=job.get("params", {}))
            if response.status_code == 404:
                pytest.fail(f"{url}: is rabbitmq_prometheus enabled?")
            assert response.status_code == 200, response.text
            names |= Scrape.parse(response.text).names()
    queried = metric_names(dashboard_exprs() + alert_exprs(), "rabbitmq_")
    assert {
        "rabbitmq_detailed_queue_messages_ready",
        "rabbitmq_detailed_queue_messages_unacked",
        "rabbitmq_global_messages_received_total",
        "rabbitmq_global_messages_delivered_total",
    } <= queried
    missing = queried - names - _SYNTHETIC
    assert not missing, f"queried but not in RabbitMQ's scrape: {sorted(missing)}"
