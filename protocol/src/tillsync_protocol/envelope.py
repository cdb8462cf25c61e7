"""The envelope every message shares: version, type, identity and time.

A *document* (receipt, shift close…) is produced by a register and kept by central; its
envelope carries the idempotency key ``(register_id, seq)`` and a unique ``doc_id``. A
*control* message (ack, heartbeat, catalog change…) carries a ``msg_id`` instead.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from .money import Seq, UnixMillis, Uuid, WireId

__all__ = ["PROTOCOL_VERSION", "ControlMessage", "Document", "Message", "Version"]

PROTOCOL_VERSION: tuple[int, int] = (1, 0)
"""(major, minor) this library writes and reads."""

Version = Annotated[
    list[Annotated[StrictInt, Field(ge=0, le=65535)]], Field(min_length=2, max_length=2)
]


class Model(BaseModel):
    """Base of every protocol model: strict types, unknown fields refused, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def require_ordered(model: Model, low: str, high: str) -> None:
    """Refuse an inclusive range whose ends are reversed (``invalid_value``)."""
    if getattr(model, low) > getattr(model, high):
        raise ValueError(f"{low} must not be greater than {high}")


class Message(Model):
    """Fields every message has."""

    kind: ClassVar[str] = "message"
    v: Version = Field(default_factory=lambda: list(PROTOCOL_VERSION))
    type: str
    created_at: UnixMillis


class Document(Message):
    """A register's document: immutable once written; corrections are new documents."""

    kind: ClassVar[str] = "document"
    doc_id: Uuid
    register_id: WireId
    center_id: WireId
    seq: Seq


class ControlMessage(Message):
    """A message that steers the flows rather than recording a sale."""

    kind: ClassVar[str] = "control"
    msg_id: Uuid
