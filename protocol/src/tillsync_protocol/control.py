"""Control messages: acks, heartbeats, catalog changes, delta RPC, reinit and resend."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, model_validator
from typing_extensions import TypeAliasType

from .catalog import EntityName
from .envelope import ControlMessage, Model, require_ordered
from .money import Code, Count, EntityId, Seq, Text, UnixMillis, Uuid, WireId

__all__ = [
    "CONTROL_TYPES",
    "Ack",
    "AckBody",
    "CatalogChange",
    "CatalogChangeBody",
    "CatalogValue",
    "DeltaEnd",
    "DeltaEndBody",
    "DeltaPage",
    "DeltaPageBody",
    "DeltaRequest",
    "DeltaRequestBody",
    "Heartbeat",
    "HeartbeatBody",
    "Reinit",
    "ReinitBody",
    "Rejection",
    "ResendRequest",
    "ResendRequestBody",
    "SeqRange",
    "SyncSummary",
]

# The state of a catalog entity: nested maps and lists of nil, booleans, integers and
# strings. Money inside it follows the same rule as everywhere: integer minor units.
# (pydantic copies mutable defaults per instance, and every model is frozen: the
# ``= []`` / ``= {}`` defaults below are safe, hence their RUF012 exemptions.)
CatalogValue = TypeAliasType(
    "CatalogValue",
    "StrictBool | StrictInt | StrictStr | list[CatalogValue] | dict[str, CatalogValue] | None",
)
ScopeName = Annotated[StrictStr, Field(pattern=r"^(global|[a-z0-9][a-z0-9-]{0,62})$")]
Cursors = Annotated[
    dict[ScopeName, Annotated[StrictInt, Field(ge=0, le=2**63 - 1)]], Field(max_length=64)
]
Entities = Annotated[list[EntityName], Field(max_length=32)]


class SeqRange(Model):
    """An inclusive range of accepted seqs."""

    first: Seq
    last: Seq

    @model_validator(mode="after")
    def _ordered(self) -> SeqRange:
        require_ordered(self, "first", "last")
        return self


class Rejection(Model):
    """One refused document: the register keeps it, shows it and does not resend it."""

    seq: Seq
    doc_id: Uuid | None = None
    code: Code
    field: Annotated[StrictStr, Field(max_length=200)] = ""
    reason: Text


class AckBody(Model):
    register_id: WireId
    accepted: Annotated[list[SeqRange], Field(max_length=10_000)]
    rejected: Annotated[list[Rejection], Field(max_length=10_000)] = []  # noqa: RUF012


class SyncSummary(Model):
    kind: Literal["documents", "catalog_delta", "reinit"]
    result: Literal["successful", "partially_successful", "failed"]
    started_at: UnixMillis
    finished_at: UnixMillis
    sent: Count = 0
    received: Count = 0
    errors: Count = 0


class HeartbeatBody(Model):
    register_id: WireId
    center_id: WireId
    agent_version: Annotated[StrictStr, Field(max_length=64)]
    pending: Count
    rejected: Count
    acknowledged: Count
    last_seq: Count
    cursors: Cursors = {}  # noqa: RUF012
    last_sync: SyncSummary | None = None
    last_error: Text | None = None


class CatalogChangeBody(Model):
    """One committed change of the central catalog, in its scope's order."""

    scope: ScopeName
    scope_seq: Seq
    entity: EntityName
    key: EntityId
    op: Literal["upsert", "delete"]
    version: Seq
    state: dict[str, CatalogValue] | None = None


class DeltaRequestBody(Model):
    """Ask for what changed since ``cursors`` (``mode="delta"``) or a full snapshot."""

    request_id: Uuid
    register_id: WireId
    center_id: WireId
    mode: Literal["delta", "snapshot"] = "delta"
    cursors: Cursors = {}  # noqa: RUF012
    entities: Entities | None = None
    with_customers: StrictBool = True
    page_size: Annotated[StrictInt, Field(ge=1, le=5000)] = 1000


class DeltaPageBody(Model):
    request_id: Uuid
    page_no: Annotated[StrictInt, Field(ge=1, le=2**31)]
    changes: Annotated[list[CatalogChangeBody], Field(max_length=5000)]


class DeltaEndBody(Model):
    """The last reply to a delta request: how many pages and changes, and the new cursors."""

    request_id: Uuid
    pages: Count
    changes: Count
    cursors: Cursors
    error_code: Code | None = None
    error_reason: Text | None = None


class ReinitBody(Model):
    """A command from central: reload the catalog (``update`` upserts, ``replace`` swaps)."""

    command_id: Uuid
    mode: Literal["update", "replace"]
    with_customers: StrictBool = True
    entities: Entities | None = None
    requested_by: EntityId


class ResendRequestBody(Model):
    """Central found a hole in a register's seqs and asks for the range again."""

    register_id: WireId
    from_seq: Seq
    to_seq: Seq
    reason: Text

    @model_validator(mode="after")
    def _ordered(self) -> ResendRequestBody:
        require_ordered(self, "from_seq", "to_seq")
        return self


class Ack(ControlMessage):
    type: Literal["ack"] = "ack"
    body: AckBody


class Heartbeat(ControlMessage):
    type: Literal["heartbeat"] = "heartbeat"
    body: HeartbeatBody


class CatalogChange(ControlMessage):
    type: Literal["catalog_change"] = "catalog_change"
    body: CatalogChangeBody


class DeltaRequest(ControlMessage):
    type: Literal["delta_request"] = "delta_request"
    body: DeltaRequestBody


class DeltaPage(ControlMessage):
    type: Literal["delta_page"] = "delta_page"
    body: DeltaPageBody


class DeltaEnd(ControlMessage):
    type: Literal["delta_end"] = "delta_end"
    body: DeltaEndBody


class Reinit(ControlMessage):
    type: Literal["reinit"] = "reinit"
    body: ReinitBody


class ResendRequest(ControlMessage):
    type: Literal["resend_request"] = "resend_request"
    body: ResendRequestBody


CONTROL_TYPES: dict[str, type[ControlMessage]] = {
    cls.model_fields["type"].default: cls
    for cls in (
        Ack,
        Heartbeat,
        CatalogChange,
        DeltaRequest,
        DeltaPage,
        DeltaEnd,
        Reinit,
        ResendRequest,
    )
}
