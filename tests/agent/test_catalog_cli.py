"""``tillsync-agent sync`` / ``reinit`` when the service goes away mid-request: the
command ends with an error (code, reason) and exit 2, not a traceback."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import typer
from typer.testing import CliRunner

from tillsync_agent.catalog_cli import register_catalog_commands


def _service_that_dies(path: Path) -> threading.Thread:
    """A socket that takes one request, sends one progress line and closes, as a service
    killed during a sync does."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def serve() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b'{"progress": {"phase": "receiving", "pages": 1}}\n')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_reinit_whose_service_dies_says_so_and_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(f'register_id = "r-1"\ncenter_id = "c-1"\ndata_dir = "{tmp_path}"\n')
    app = typer.Typer()
    register_catalog_commands(app)
    service = _service_that_dies(tmp_path / "agent.sock")
    result = CliRunner().invoke(app, ["reinit", "--mode", "replace", "--config", str(config)])
    service.join(5)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # typer.Exit, not a traceback
    assert "not_running" in result.output
    assert "run the command again" in result.output
