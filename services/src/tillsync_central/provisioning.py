"""Enrolling and revoking registers: their rows, their queue and their broker user.

A register logs in as its own broker user ``reg-<register_id>`` with the least rights
that let it work, and the broker enforces them (invariant 5):

- configure ``^$``: it declares, deletes and binds nothing;
- write: the three exchanges it publishes to, and on each only its own routing keys
  (topic permissions): documents ``<center>.<register>.<doc_type>``, heartbeats
  ``hb.<center>.<register>``, requests ``rpc.<center>.<register>.<name>``;
- read: its own queue, written literally (RabbitMQ does not expand ``{username}`` in
  queue permissions, and expands it unescaped in topic permissions, so we use neither).

Adding is idempotent: running it again for the same register sets a new password and
re-applies the queue, bindings and permissions (and lifts a revocation).

With TLS the bundle carries the CA that signed the broker's certificate, and with a
register CA configured (``register_client_ca_*`` settings) a client certificate whose
common name is the register's broker user: the register then logs in with it (SASL
EXTERNAL) and its broker user has no password at all.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import asyncpg

from tillsync_protocol import TillsyncError, topology

from .client_certs import ClientCertificate, issue_client_certificate
from .management import Management

__all__ = [
    "Enrollment",
    "Permissions",
    "ProvisioningError",
    "RegisterInfo",
    "RegisterTls",
    "Revocation",
    "add_register",
    "list_registers",
    "permissions_for",
    "register_amqp_url",
    "revoke_register",
]

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_WRITE_EXCHANGES = (topology.DOCS_EXCHANGE, topology.PRESENCE_EXCHANGE, topology.RPC_EXCHANGE)


class ProvisioningError(TillsyncError):
    """A register cannot be enrolled or revoked as asked."""

    code = "provisioning_error"


@dataclass(frozen=True)
class RegisterTls:
    """What registers get for TLS: the broker's CA, and a CA to issue client certificates."""

    broker_ca_pem: str | None = None
    client_ca_cert_file: Path | None = None
    client_ca_key_file: Path | None = None
    client_cert_days: int = 825


@dataclass(frozen=True)
class Enrollment:
    """What a register needs to connect: give it to the register, then forget it."""

    register_id: str
    center_id: str
    broker_user: str
    password: str | None
    """None when the register logs in with its client certificate."""
    amqp_url: str
    broker_ca_pem: str | None = None
    client_certificate: ClientCertificate | None = None

    def __repr__(self) -> str:  # the password and the URL carrying it stay out of logs
        return (
            f"Enrollment(register_id={self.register_id!r}, center_id={self.center_id!r}, "
            f"broker_user={self.broker_user!r}, password='***', amqp_url='***', "
            f"client_certificate={self.client_certificate is not None})"
        )

    def agent_config(self) -> str:
        """The register's agent settings as a TOML file (the ``--bundle``); PEMs are TOML
        strings that ``tillsync-agent enroll`` writes to files of their own."""
        lines = [
            "# tillsync agent enrollment: keep this file secret (it holds a password or a key)",
            f"register_id = {_toml(self.register_id)}",
            f"center_id = {_toml(self.center_id)}",
            f"amqp_url = {_toml(self.amqp_url)}",
        ]
        if self.broker_ca_pem is not None:
            lines.append(f"tls_ca_pem = {_toml(self.broker_ca_pem)}")
        if self.client_certificate is not None:
            lines.append(f"tls_cert_pem = {_toml(self.client_certificate.cert_pem)}")
            lines.append(f"tls_key_pem = {_toml(self.client_certificate.key_pem)}")
        return "\n".join(lines) + "\n"


def _toml(text: str) -> str:
    # A JSON string is a TOML basic string: the same quotes and escapes.
    return json.dumps(text, ensure_ascii=False)


@dataclass(frozen=True)
class Revocation:
    register_id: str
    broker_user: str
    user_deleted: bool
    connections_closed: int


@dataclass(frozen=True)
class RegisterInfo:
    register_id: str
    center_id: str
    broker_user: str
    created_at: datetime
    revoked_at: datetime | None
    contiguous_seq: int
    last_seq: int
    last_received_at: datetime | None


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str
    topic_write: dict[str, str]
    topic_read: dict[str, str] = field(default_factory=dict)
    """Per topic exchange, the binding keys allowed (``queue.bind`` checks them); ``^$``
    for an exchange in ``topic_write`` but not here."""


def permissions_for(center_id: str, register_id: str) -> Permissions:
    """The broker permissions of one register (regexes, ids escaped)."""
    center, register = re.escape(center_id), re.escape(register_id)
    exchanges = "|".join(re.escape(name) for name in _WRITE_EXCHANGES)
    return Permissions(
        configure="^$",
        write=f"^({exchanges})$",
        read=f"^{re.escape(topology.register_queue(register_id))}$",
        topic_write={
            topology.DOCS_EXCHANGE: rf"^{center}\.{register}\.[a-z_]+$",
            topology.PRESENCE_EXCHANGE: rf"^hb\.{center}\.{register}$",
            topology.RPC_EXCHANGE: rf"^rpc\.{center}\.{register}\..+$",
        },
    )


def register_amqp_url(amqp_url: str, user: str | None, password: str | None) -> str:
    """``amqp_url`` (central's) with the register's credentials instead of central's; with
    no user, none at all and ``auth=external`` (the client certificate names the user)."""
    parts = urlsplit(amqp_url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if parts.port is not None:
        host += f":{parts.port}"
    query = parts.query
    if user is None:
        netloc = host
        pairs = [(k, v) for k, v in parse_qsl(query) if k != "auth"]
        query = urlencode([*pairs, ("auth", "external")])
    else:
        netloc = f"{quote(user, safe='')}:{quote(password or '', safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


_UPSERT_CENTER = "INSERT INTO centers (center_id, name) VALUES ($1, $1) ON CONFLICT DO NOTHING"
_SELECT_REGISTER = "SELECT center_id, revoked_at FROM registers WHERE register_id = $1 FOR UPDATE"
_INSERT_REGISTER = """
INSERT INTO registers (register_id, center_id, broker_user) VALUES ($1, $2, $3)
"""
_UNREVOKE = "UPDATE registers SET revoked_at = NULL WHERE register_id = $1"
_INSERT_STATE = "INSERT INTO register_state (register_id) VALUES ($1) ON CONFLICT DO NOTHING"
_REVOKE = """
UPDATE registers SET revoked_at = COALESCE(revoked_at, now())
WHERE register_id = $1 RETURNING broker_user
"""
_LIST = """
SELECT r.register_id, r.center_id, r.broker_user, r.created_at, r.revoked_at,
       COALESCE(s.contiguous_seq, 0) AS contiguous_seq, COALESCE(s.last_seq, 0) AS last_seq,
       s.last_received_at
FROM registers r LEFT JOIN register_state s USING (register_id)
WHERE $1::text IS NULL OR r.center_id = $1
ORDER BY r.center_id, r.register_id
"""


def _check_id(value: str, field: str) -> None:
    if not _ID.match(value):
        raise ProvisioningError(
            f"{value!r} is not a valid id: lowercase letters, digits and '-', 1 to 63 "
            "characters, not starting with '-'",
            field=field,
            code="invalid_value",
        )


async def add_register(
    pool: asyncpg.Pool,
    management: Management,
    amqp_url: str,
    center_id: str,
    register_id: str,
    password: str | None = None,
    *,
    tls: RegisterTls | None = None,
) -> Enrollment:
    """Enroll a register (and its center if new); return what it needs to connect.

    ``amqp_url`` is the broker URL for registers (central's own, or
    ``register_broker_url``): the register's URL is the same with the register's
    credentials. The shared topology must already be declared. With ``tls`` issuing
    client certificates, the register gets one instead of a password.
    """
    _check_id(center_id, "center_id")
    _check_id(register_id, "register_id")
    user = topology.register_username(register_id)
    tls = RegisterTls() if tls is None else tls
    certificate: ClientCertificate | None = None
    ca_cert, ca_key = tls.client_ca_cert_file, tls.client_ca_key_file
    if ca_cert is not None and ca_key is not None:
        if password is not None:
            raise ProvisioningError(
                "a register with a client certificate has no password",
                field="password",
                code="invalid_value",
            )
        if urlsplit(amqp_url).scheme != "amqps":
            raise ProvisioningError(
                "client certificates need an amqps:// broker URL for registers",
                field="register_broker_url",
                code="invalid_value",
            )
        # Before any change: a CA that cannot sign leaves the register as it was.
        certificate = await asyncio.to_thread(  # two openssl runs: off the event loop
            issue_client_certificate, ca_cert, ca_key, user, days=tls.client_cert_days
        )
    else:
        password = secrets.token_urlsafe(24) if password is None else password
        if not password:
            raise ProvisioningError("the password must not be empty", field="password")
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_UPSERT_CENTER, center_id)
        existing = await conn.fetchrow(_SELECT_REGISTER, register_id)
        if existing is None:
            await conn.execute(_INSERT_REGISTER, register_id, center_id, user)
        elif existing["center_id"] != center_id:
            raise ProvisioningError(
                f"register {register_id!r} belongs to center {existing['center_id']!r}",
                field="center_id",
                code="register_exists",
            )
        elif existing["revoked_at"] is not None:
            await conn.execute(_UNREVOKE, register_id)
        await conn.execute(_INSERT_STATE, register_id)

    # The queue before the user: once the register can log in, its queue is there.
    queue = topology.register_queue(register_id)
    await management.declare_queue(queue, topology.register_queue_arguments())
    for binding in topology.register_queue_bindings(register_id, center_id):
        await management.bind(binding.exchange, binding.queue, binding.routing_key)

    rights = permissions_for(center_id, register_id)
    await management.put_user(user, password)  # None: no password login at all
    await management.set_permissions(
        user, configure=rights.configure, write=rights.write, read=rights.read
    )
    for exchange, write in rights.topic_write.items():
        await management.set_topic_permissions(user, exchange, write=write, read="^$")
    return Enrollment(
        register_id=register_id,
        center_id=center_id,
        broker_user=user,
        password=password,
        amqp_url=register_amqp_url(
            amqp_url, None if certificate else user, None if certificate else password
        ),
        broker_ca_pem=tls.broker_ca_pem,
        client_certificate=certificate,
    )


async def revoke_register(
    pool: asyncpg.Pool, management: Management, register_id: str
) -> Revocation:
    """Revoke a register: it can no longer log in, its open connections are closed and
    ingest refuses what it still has in flight (``unknown_register``). Its documents and
    its queue are kept. Revoking twice is harmless."""
    _check_id(register_id, "register_id")
    async with pool.acquire() as conn:
        user = await conn.fetchval(_REVOKE, register_id)
    if user is None:
        raise ProvisioningError(
            f"no register {register_id!r}", field="register_id", code="unknown_register"
        )
    # Delete the user first, so that a closed connection cannot log in again.
    deleted = await management.delete_user(user)
    closed = 0
    for name in await management.connections_of(user):
        if await management.close_connection(name, "register revoked"):
            closed += 1
    return Revocation(register_id, user, deleted, closed)


async def list_registers(pool: asyncpg.Pool, center_id: str | None = None) -> list[RegisterInfo]:
    """Every register (of one center), with where its documents stand."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(_LIST, center_id)
    return [RegisterInfo(**dict(row)) for row in rows]
