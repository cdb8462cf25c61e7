"""Commands central sends to registers: ``reinit`` (reload the catalog).

A command goes to ``tillsync.registers`` with key ``reg.<register>.command`` and lands
in that register's own queue; it is persistent and published with confirms, so a
register that is offline finds it when it comes back (unless its bounded queue
overflowed meanwhile: then send it again).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, cast

import aio_pika
import asyncpg

from tillsync_protocol import ENTITIES, Reinit, ReinitBody, topology
from tillsync_protocol.catalog import EntityName

from .confirms import control_message, publish_in_order
from .provisioning import ProvisioningError
from .settings import CentralSettings

__all__ = ["ReinitOrder", "registers_for", "send_reinit"]

_ACTIVE_OF_CENTER = """
SELECT register_id FROM registers WHERE center_id = $1 AND revoked_at IS NULL
ORDER BY register_id
"""
_ONE = "SELECT register_id, revoked_at FROM registers WHERE register_id = $1"


@dataclass(frozen=True)
class ReinitOrder:
    mode: Literal["update", "replace"]
    with_customers: bool = True
    entities: Sequence[str] | None = None
    requested_by: str = "tillsync-central"


async def registers_for(
    pool: asyncpg.Pool, *, register_id: str | None = None, center_id: str | None = None
) -> list[str]:
    """The active registers a command goes to: one register, or every one of a center."""
    async with pool.acquire() as conn:
        if register_id is not None:
            row = await conn.fetchrow(_ONE, register_id)
            if row is None or row["revoked_at"] is not None:
                state = "unknown" if row is None else "revoked"
                raise ProvisioningError(
                    f"register {register_id!r} is {state}",
                    field="register",
                    code="unknown_register",
                )
            return [register_id]
        rows = await conn.fetch(_ACTIVE_OF_CENTER, center_id)
    return [row["register_id"] for row in rows]


def _check_entities(entities: Sequence[str] | None) -> list[EntityName] | None:
    if entities is None:
        return None
    unknown = [e for e in entities if e not in ENTITIES]
    if unknown:
        raise ProvisioningError(
            f"{unknown[0]!r} is not a catalog entity (one of {', '.join(ENTITIES)})",
            field="entities",
            code="invalid_value",
        )
    return [cast(EntityName, e) for e in entities]


async def send_reinit(
    settings: CentralSettings, register_ids: Sequence[str], order: ReinitOrder
) -> list[Reinit]:
    """Publish one ``reinit`` per register (confirmed); the commands sent."""
    entities = _check_entities(order.entities)
    commands = [
        Reinit(
            msg_id=str(uuid.uuid4()),
            created_at=time.time_ns() // 1_000_000,
            body=ReinitBody(
                command_id=str(uuid.uuid4()),
                mode=order.mode,
                with_customers=order.with_customers,
                entities=entities,
                requested_by=order.requested_by,
            ),
        )
        for _ in register_ids
    ]
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value(), timeout=15)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.REGISTERS_EXCHANGE, ensure=False)
        await publish_in_order(
            exchange,
            (
                (control_message(command), topology.register_key(register_id, "command"))
                for command, register_id in zip(commands, register_ids, strict=True)
            ),
        )
    return commands
