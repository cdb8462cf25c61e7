"""A small client of the RabbitMQ management HTTP API, for one virtual host.

Provisioning uses it to create register users with least rights, their queues and
bindings, and to revoke them (delete the user, close its connections). Every call has a
timeout; an unexpected answer raises :class:`ManagementError` with the HTTP status.
"""

from __future__ import annotations

import functools
import ssl
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote, unquote, urlsplit

import httpx

from tillsync_protocol import TillsyncError, topology

from .settings import CentralSettings, redact_url

__all__ = ["Management", "ManagementError", "vhost_of"]

DEFAULT_TIMEOUT_S = 10.0


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The one TLS context of every client of the process. httpx makes one per client,
    even for an ``http://`` URL, and that reads the whole CA bundle: 16 ms of CPU on the
    event loop here, which the admin app's queue sampler paid every 5 s, stalling the
    ingest workers beside it (docs/performance.md)."""
    return httpx.create_ssl_context()


class ManagementError(TillsyncError):
    """The management API refused a request or could not be reached."""

    code = "broker_management_error"


def vhost_of(amqp_url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when the path is empty)."""
    path = urlsplit(amqp_url).path
    return "/" if path in ("", "/") else unquote(path[1:])


def _q(part: str) -> str:
    return quote(part, safe="")


class Management:
    """The management API of one vhost: ``async with Management.from_settings(s) as m``."""

    def __init__(self, api_url: str, vhost: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        parts = urlsplit(api_url)
        base = f"{parts.scheme}://{parts.hostname}"
        if parts.port is not None:
            base += f":{parts.port}"
        base += parts.path.rstrip("/")
        auth = (unquote(parts.username or ""), unquote(parts.password or ""))
        self.vhost = vhost
        self._redacted = redact_url(api_url)
        self._client = httpx.AsyncClient(
            base_url=base, auth=auth, timeout=timeout, verify=_tls_context()
        )

    @classmethod
    def from_settings(cls, settings: CentralSettings) -> Management:
        """The API of the vhost that ``settings.amqp_url`` names."""
        return cls(
            settings.rabbitmq_api_url.get_secret_value(),
            vhost_of(settings.amqp_url.get_secret_value()),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._client.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        ok_missing: bool = False,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        try:
            response = await self._client.request(method, path, json=json, headers=headers)
        except httpx.HTTPError as exc:
            raise ManagementError(
                f"{method} {path} at {self._redacted} failed: {type(exc).__name__}: {exc}",
                field="rabbitmq_api_url",
            ) from exc
        if response.status_code == 404 and ok_missing:
            return response
        if response.status_code >= 400:
            raise ManagementError(
                f"{method} {path} answered {response.status_code}: {response.text[:500]}",
                field="rabbitmq_api_url",
            )
        return response

    # -- users and permissions ------------------------------------------------------------

    async def put_user(self, name: str, password: str | None, *, tags: str = "") -> None:
        """Create the user or change its password; no ``tags``: no management access. With
        no password the user cannot log in with one (only with a client certificate)."""
        body = {"password": password} if password is not None else {"password_hash": ""}
        await self._request("PUT", f"/api/users/{_q(name)}", json={**body, "tags": tags})

    async def delete_user(self, name: str) -> bool:
        """Delete the user; False if it did not exist."""
        response = await self._request("DELETE", f"/api/users/{_q(name)}", ok_missing=True)
        return response.status_code != 404

    async def user_exists(self, name: str) -> bool:
        response = await self._request("GET", f"/api/users/{_q(name)}", ok_missing=True)
        return response.status_code != 404

    async def set_permissions(self, user: str, *, configure: str, write: str, read: str) -> None:
        await self._request(
            "PUT",
            f"/api/permissions/{_q(self.vhost)}/{_q(user)}",
            json={"configure": configure, "write": write, "read": read},
        )

    async def set_topic_permissions(
        self, user: str, exchange: str, *, write: str, read: str
    ) -> None:
        await self._request(
            "PUT",
            f"/api/topic-permissions/{_q(self.vhost)}/{_q(user)}",
            json={"exchange": exchange, "write": write, "read": read},
        )

    # -- queues and bindings --------------------------------------------------------------

    async def declare_shared_topology(self) -> None:
        """Declare every shared exchange, queue and binding (a definitions import: what
        ``tillsync-central run`` declares itself unless ``declare_topology`` is off)."""
        await self._request(
            "POST", f"/api/definitions/{_q(self.vhost)}", json=topology.definitions(self.vhost)
        )

    async def declare_queue(self, name: str, arguments: dict[str, Any]) -> None:
        """Declare a durable queue (idempotent while the arguments do not change)."""
        await self._request(
            "PUT",
            f"/api/queues/{_q(self.vhost)}/{_q(name)}",
            json={"durable": True, "auto_delete": False, "arguments": arguments},
        )

    async def bind(self, exchange: str, queue: str, routing_key: str) -> None:
        """Bind ``queue`` to ``exchange`` (binding twice leaves one binding)."""
        await self._request(
            "POST",
            f"/api/bindings/{_q(self.vhost)}/e/{_q(exchange)}/q/{_q(queue)}",
            json={"routing_key": routing_key, "arguments": {}},
        )

    # -- connections ----------------------------------------------------------------------

    async def connections_of(self, user: str) -> list[str]:
        """Names of the user's open connections to this vhost."""
        response = await self._request(
            "GET", f"/api/vhosts/{_q(self.vhost)}/connections", ok_missing=True
        )
        if response.status_code == 404:
            return []
        return [c["name"] for c in response.json() if c.get("user") == user]

    async def close_connection(self, name: str, reason: str) -> bool:
        """Close one connection; False if it was already gone."""
        response = await self._request(
            "DELETE",
            f"/api/connections/{_q(name)}",
            ok_missing=True,
            headers={"X-Reason": reason},
        )
        return response.status_code != 404
