"""The three distributions as installed: dependencies and console scripts.

The protocol package must stay installable on its own (a register written in Python
needs nothing else), and the agent must never pull server-side packages onto a till.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import zipfile
from email.parser import Parser
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL_DEPENDENCIES = {"msgpack", "pydantic", "typing-extensions"}
SERVER_SIDE = {
    "tillsync-central",
    "asyncpg",
    "psycopg",
    "psycopg2",
    "psycopg2-binary",
    "sqlalchemy",
    "alembic",
    "testcontainers",
}


def direct_requirements(name: str) -> list[Requirement]:
    """Requirements of an installed distribution that apply without extras."""
    found = [Requirement(text) for text in distribution(name).requires or []]
    return [r for r in found if r.marker is None or r.marker.evaluate({"extra": ""})]


def closure(name: str) -> set[str]:
    """Canonical names of ``name`` and everything it needs, as installed here."""
    seen: set[str] = set()
    todo = [canonicalize_name(name)]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            requirements = direct_requirements(current)
        except PackageNotFoundError:
            pytest.fail(f"{current} is required (by the closure of {name}) but not installed")
        todo.extend(canonicalize_name(r.name) for r in requirements)
    return seen


def test_protocol_requires_only_msgpack_pydantic_and_typing_extensions() -> None:
    names = {canonicalize_name(r.name) for r in direct_requirements("tillsync-protocol")}
    assert names == PROTOCOL_DEPENDENCIES


def test_protocol_closure_has_no_io_packages() -> None:
    io = {"aio-pika", "aiormq", "asyncpg", "aiosqlite", "httpx", "structlog", "typer"}
    assert not closure("tillsync-protocol") & io


def test_agent_closure_has_no_server_side_packages() -> None:
    everything = closure("tillsync-agent")
    assert "tillsync-protocol" in everything
    assert not everything & SERVER_SIDE, sorted(everything & SERVER_SIDE)


def test_agent_and_central_depend_on_the_protocol() -> None:
    for name in ("tillsync-agent", "tillsync-central"):
        names = {canonicalize_name(r.name) for r in direct_requirements(name)}
        assert "tillsync-protocol" in names


@pytest.mark.parametrize(
    ("dist", "script", "target"),
    [
        ("tillsync-protocol", "tillsync-protocol", "tillsync_protocol.cli:main"),
        ("tillsync-agent", "tillsync-agent", "tillsync_agent.cli:main"),
        ("tillsync-central", "tillsync-central", "tillsync_central.cli:main"),
    ],
)
def test_console_scripts_are_declared(dist: str, script: str, target: str) -> None:
    scripts = {
        ep.name: ep.value for ep in distribution(dist).entry_points if ep.group == "console_scripts"
    }
    assert scripts.get(script) == target


def _uv() -> str:
    found = os.environ.get("UV") or shutil.which("uv")
    assert found, "uv is needed to build the wheel"
    return found


def test_protocol_wheel_alone_declares_only_its_three_dependencies(tmp_path: Path) -> None:
    subprocess.run(
        [_uv(), "build", "--package", "tillsync-protocol", "--wheel", "-o", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=180,
    )
    (wheel,) = tmp_path.glob("tillsync_protocol-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    lines = metadata.get_all("Requires-Dist") or []
    required = {canonicalize_name(Requirement(line).name) for line in lines}
    assert required == PROTOCOL_DEPENDENCIES
    assert metadata["Name"] == "tillsync-protocol"
    packages = {n.split("/")[0] for n in names if ".dist-info/" not in n}
    assert packages == {"tillsync_protocol"}
    assert "tillsync_protocol/py.typed" in names
    assert not [n for n in names if re.search(r"vectors|tests?/", n)]
