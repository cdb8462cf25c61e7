"""Serving an ASGI app inside central's own event loop: the admin API and ``/metrics``.

The socket is bound before serving, so a taken port fails the start-up with a
``ConfigError`` naming the setting, and uvicorn runs without its signal handlers: the
process's runner owns SIGTERM and SIGINT and ends the server by ``should_exit``.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

from tillsync_protocol import ConfigError

__all__ = ["embedded_server", "listen"]


def listen(host: str, port: int, *, setting: str, what: str) -> socket.socket:
    """A non-blocking listening socket on ``host:port`` (0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=256)
    except OSError as exc:
        raise ConfigError(
            f"{what} cannot listen on {host}:{port}: {exc.strerror or exc}", field=setting
        ) from None
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def embedded_server(app: ASGIApp, *, shutdown_timeout: int) -> uvicorn.Server:
    """A uvicorn server for ``await server.serve(sockets=[sock])``; set ``should_exit``
    to stop it (open requests get ``shutdown_timeout`` seconds)."""
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        http="h11",
        ws="none",
        timeout_graceful_shutdown=shutdown_timeout,
    )
    return _Server(config)
