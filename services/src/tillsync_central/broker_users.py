"""Central's own broker user, with only the rights its workers use (issue #6).

``tillsync-central run`` (ingest, dead letters, relay, catalog RPC, presence, reconciler)
and the commands that publish (``reinit``, dead-letter replay) log in with ``amqp_url``.
In production that is the service user this module provisions, not the administrator
whose credentials are in ``rabbitmq_api_url`` (which only this setup and enrolling and
revoking registers need). :func:`setup_service_user` declares the shared topology itself,
through the management API, and the workers run with ``declare_topology`` off (they only
check passively that it exists). The broker enforces, on the central vhost:

- configure: nothing — the service user cannot declare, delete or redeclare any queue or
  exchange, neither a register's nor central's own (``tillsync.ingest`` included);
- write: only the exchanges central publishes to (``tillsync.registers``: acks, delta
  pages, commands, resend requests; ``tillsync.catalog``: catalog changes), each under
  its own routing keys (topic permissions) — never ``tillsync.docs`` or
  ``tillsync.presence``, so it cannot forge a register's document or heartbeat;
- read: central's own queues — never a register's queue;
- no tags: no management API access, so it cannot create users or change permissions.

:func:`setup_monitoring_user` makes the read-only user the dashboard's queue page (and a
Prometheus or a person) reads the management API with: tag ``monitoring`` (it can read,
not change, the broker's state), access to the central vhost with no AMQP rights at all
(it can neither publish, consume nor declare). Its URL is the ``rabbitmq_api_url`` of the
hosts that only serve the dashboard.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from tillsync_protocol import topology

from .management import Management
from .provisioning import Permissions, ProvisioningError, register_amqp_url

__all__ = [
    "MONITORING_USER",
    "SERVICE_USER",
    "ServiceUser",
    "service_permissions",
    "setup_monitoring_user",
    "setup_service_user",
]

SERVICE_USER = "tillsync-central"
MONITORING_USER = "tillsync-monitor"

_USER = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_PUBLISHES_TO = (topology.REGISTERS_EXCHANGE, topology.CATALOG_EXCHANGE)


@dataclass(frozen=True)
class ServiceUser:
    """The outcome of :func:`setup_service_user`."""

    user: str
    created: bool
    password_changed: bool
    amqp_url: str | None
    """The URL (``amqp_url`` for the service user, ``rabbitmq_api_url`` for the monitoring
    user) with the user's credentials when its password was set now (else None: the
    password is unchanged and not known here)."""

    def __repr__(self) -> str:  # the URL carries the password
        return (
            f"ServiceUser(user={self.user!r}, created={self.created}, "
            f"password_changed={self.password_changed}, amqp_url='***')"
        )


def _alternatives(names: list[str] | tuple[str, ...]) -> str:
    return "^(" + "|".join(re.escape(name) for name in sorted(set(names))) + ")$"


def service_permissions() -> Permissions:
    """The service user's permissions on the central vhost (regexes)."""
    queues = [queue.name for queue in topology.queues()]
    # Topic exchanges it must not publish to get an empty topic permission too (defence
    # in depth: the vhost write permission already leaves them out).
    topic_write = {
        exchange.name: "^$"
        for exchange in topology.exchanges()
        if exchange.type == "topic" and exchange.name not in _PUBLISHES_TO
    }
    topic_write[topology.REGISTERS_EXCHANGE] = r"^reg\.[a-z0-9-]+\.[a-z_]+$"
    topic_write[topology.CATALOG_EXCHANGE] = r"^cat\.[a-z0-9-]+\.[a-z_]+$"
    return Permissions(
        configure="^$",
        write=_alternatives(_PUBLISHES_TO),
        read=_alternatives(queues),
        topic_write=topic_write,
        topic_read={},  # it binds nothing
    )


async def setup_service_user(
    management: Management,
    amqp_url: str,
    *,
    user: str = SERVICE_USER,
    password: str | None = None,
    rotate: bool = False,
) -> ServiceUser:
    """Declare the shared topology, create or update the service user and (re)apply its
    permissions; idempotent.

    An existing user keeps its password unless ``password`` is given or ``rotate`` asks
    for a new random one, so running this again does not lock out running workers.
    ``amqp_url`` gives the host and vhost of the returned URL.
    """
    exists, password = await _put_user(management, user, password, rotate, tags="")
    await management.declare_shared_topology()  # the workers may only check it
    rights = service_permissions()
    await management.set_permissions(
        user, configure=rights.configure, write=rights.write, read=rights.read
    )
    for exchange, write in rights.topic_write.items():
        read = rights.topic_read.get(exchange, "^$")
        await management.set_topic_permissions(user, exchange, write=write, read=read)
    return _outcome(user, exists, password, amqp_url)


async def setup_monitoring_user(
    management: Management,
    api_url: str,
    *,
    user: str = MONITORING_USER,
    password: str | None = None,
    rotate: bool = False,
) -> ServiceUser:
    """Create or update the read-only management user (tag ``monitoring``, no AMQP rights
    on the central vhost); idempotent, and the password is kept as
    :func:`setup_service_user` keeps it. ``api_url`` gives the host of the returned URL."""
    exists, password = await _put_user(management, user, password, rotate, tags="monitoring")
    # An entry for the vhost lets it read the vhost's queues; every right is empty.
    await management.set_permissions(user, configure="^$", write="^$", read="^$")
    return _outcome(user, exists, password, api_url)


def _outcome(user: str, exists: bool, password: str | None, url: str) -> ServiceUser:
    """What was done; ``url`` with the user's credentials when its password was set now."""
    return ServiceUser(
        user=user,
        created=not exists,
        password_changed=password is not None,
        amqp_url=None if password is None else register_amqp_url(url, user, password),
    )


async def _put_user(
    management: Management, user: str, password: str | None, rotate: bool, *, tags: str
) -> tuple[bool, str | None]:
    """Check the name, create the user or set its password and tags; returns whether it
    existed and the password set now (None: kept)."""
    if not _USER.match(user) or user.startswith("reg-"):
        raise ProvisioningError(
            f"{user!r} is not a valid service user: lowercase letters, digits and '-', "
            "not starting with 'reg-' (registers' users)",
            field="user",
            code="invalid_value",
        )
    if password == "":
        raise ProvisioningError("the password must not be empty", field="password")
    exists = await management.user_exists(user)
    if password is None and (rotate or not exists):
        password = secrets.token_urlsafe(24)
    if password is not None:
        await management.put_user(user, password, tags=tags)
    return exists, password
