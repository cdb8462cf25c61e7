"""Strict MessagePack encoding and decoding of protocol v1 messages.

Decoding checks, in order: size, MessagePack well-formedness (one top-level map, string
map keys everywhere, no ext types, no trailing bytes, at most 32 levels of nesting), no
float anywhere, ``v`` (major must be ours), ``type`` (must be known), then every field.
The first problem found is raised as one :class:`~tillsync_protocol.errors.ProtocolError`
subclass with its field path.

Forward compatibility: a message whose minor version is newer than ours may carry fields
we do not know; they are dropped. From our own or an older minor, an unknown field is an
``unknown_field`` error.
"""

from __future__ import annotations

import copy
import gc
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, ParamSpec, TypeVar

import msgpack
from pydantic import ValidationError

from .catalog import ENTITIES
from .control import CONTROL_TYPES, DeltaPage
from .documents import DOCUMENT_TYPES
from .envelope import PROTOCOL_VERSION, ControlMessage, Document, Message
from .errors import (
    FloatNotAllowedError,
    MalformedError,
    MissingFieldError,
    ProtocolError,
    TooLargeError,
    UnknownTypeError,
    UnsupportedVersionError,
    WrongTypeError,
    protocol_error_for_code,
)

__all__ = [
    "CONTENT_TYPE",
    "MAX_MESSAGE_SIZE",
    "MESSAGE_TYPES",
    "ChangeRow",
    "CheckedDeltaPage",
    "decode",
    "decode_control",
    "decode_control_pages",
    "decode_document",
    "encode",
    "field_path",
    "to_json",
    "validate",
    "without_collection",
]

CONTENT_TYPE = "application/x-msgpack"
MAX_MESSAGE_SIZE = 1024 * 1024
"""Default largest encoded message accepted, in bytes."""

MESSAGE_TYPES: dict[str, type[Message]] = {**DOCUMENT_TYPES, **CONTROL_TYPES}

M = TypeVar("M", bound=Message)

_MISSING = object()

_MAX_DEPTH = 32
"""Deepest nesting of maps and arrays (the top-level map is level 1). Real messages use
at most a handful of levels; the limit keeps every later step (float scan, validation)
far from Python's recursion limit."""


def encode(message: Message) -> bytes:
    """Encode ``message`` canonically: fields in declaration order, nil for unset options."""
    return msgpack.packb(message.model_dump(mode="python"), use_bin_type=True)  # type: ignore[no-any-return]


def to_json(message: Message) -> dict[str, Any]:
    """The message as JSON-compatible data (what ``tillsync-protocol decode`` prints)."""
    return message.model_dump(mode="json")


def decode(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Message:
    """Decode any v1 message; raise a :class:`ProtocolError` subclass on any problem."""
    return without_collection(_decode_any, data, max_size)


def _decode_any(data: bytes, max_size: int) -> Message:
    raw = _unpack(data, max_size)
    return _validate(raw, _message_class(raw))


def validate(raw: dict[str, Any]) -> Message:
    """Validate already-unpacked data (e.g. JSON from a POS app) exactly as :func:`decode`
    validates bytes: the same checks, the same errors."""
    if not isinstance(raw, dict):
        raise MalformedError(f"the top level must be a map, not {_wire_type(raw)}")
    _check_tree(raw)
    return without_collection(_validate, raw, _message_class(raw))


def decode_document(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> Document:
    """Decode a message that must be a document (what ingest accepts)."""
    return without_collection(_decode_kind, data, max_size, Document, DOCUMENT_TYPES)


def decode_control(data: bytes, *, max_size: int = MAX_MESSAGE_SIZE) -> ControlMessage:
    """Decode a message that must be a control message (what a register accepts)."""
    return without_collection(_decode_kind, data, max_size, ControlMessage, CONTROL_TYPES)


def decode_control_pages(
    data: bytes, *, max_size: int = MAX_MESSAGE_SIZE
) -> ControlMessage | CheckedDeltaPage:
    """Decode a control message as :func:`decode_control` does, except that a valid
    ``delta_page`` comes back as a :class:`CheckedDeltaPage`: the same checks, its changes
    as tuples instead of a thousand models (what a register stages from a delta or reinit).

    A page is accepted only when every check of :func:`decode_control` would pass; a page
    the quick checks doubt in any way goes through :func:`decode_control`'s own path, so an
    invalid page raises exactly the same error (code, field, reason).
    """
    return without_collection(_decode_control_pages, data, max_size)


def _decode_control_pages(data: bytes, max_size: int) -> ControlMessage | CheckedDeltaPage:
    raw = _unpack_only(data, max_size)
    if raw.get("type") == "delta_page":
        page = _checked_page(raw)
        if page is not None:
            return page
    _check_tree(raw)
    return _validate_kind(raw, ControlMessage, CONTROL_TYPES)


ChangeRow = tuple[str, int, str, str, str, int, dict[str, Any] | None]
"""One checked catalog change: scope, scope_seq, entity, key, op, version, state (None for
none), the values :class:`~tillsync_protocol.CatalogChangeBody` would hold."""


@dataclass(frozen=True, slots=True)
class CheckedDeltaPage:
    """A ``delta_page`` that passed every check of :func:`decode_control`, its changes kept
    as :data:`ChangeRow` tuples; :meth:`model` gives the :class:`DeltaPage` itself."""

    type: ClassVar[str] = "delta_page"
    v: tuple[int, int]
    created_at: int
    msg_id: str
    request_id: str
    page_no: int
    changes: list[ChangeRow]

    def model(self) -> DeltaPage:
        """The page as :func:`decode_control` decodes it."""
        fields = ("scope", "scope_seq", "entity", "key", "op", "version", "state")
        return DeltaPage.model_validate(
            {
                "v": list(self.v),
                "type": self.type,
                "created_at": self.created_at,
                "msg_id": self.msg_id,
                "body": {
                    "request_id": self.request_id,
                    "page_no": self.page_no,
                    "changes": [dict(zip(fields, change, strict=True)) for change in self.changes],
                },
            }
        )


# What _checked_page accepts, spelled out from the models' constraints (control.py,
# money.py, envelope.py); tests/protocol/test_checked_pages.py holds the two equal.
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_SCOPE = re.compile(r"global|[a-z0-9][a-z0-9-]{0,62}")  # ScopeName, matched whole
_PAGE_KEYS = frozenset({"v", "type", "created_at", "msg_id", "body"})
_PAGE_BODY_KEYS = frozenset({"request_id", "page_no", "changes"})
_ENTITY_NAMES = frozenset(ENTITIES)
_SEQ_MAX = 2**63 - 1
_MILLIS_MAX = 253_402_300_799_999
_PAGE_NO_MAX = 2**31
_PAGE_CHANGES_MAX = 5000
_KEY_MAX = 64
_STATE_DEPTH = 4
"""The depth of a change's state in a page: page 0, body 1, changes 2, change 3."""
_STATE_LEAVES = frozenset({str, int, bool, type(None)})
"""A catalog value's leaves (``CatalogValue``): no binary, no float, no timestamp."""


def _checked_page(raw: dict[str, Any]) -> CheckedDeltaPage | None:
    """The page if it passes every check of the model path, else None (never an error: the
    caller then takes that path, which reports the problem). Only exact types pass, so
    nothing here can be a float, a timestamp or binary where the model wants otherwise."""
    try:
        return _check_page(raw)
    except Exception:  # a doubt, not an error: the model path will judge
        return None


def _check_page(raw: dict[str, Any]) -> CheckedDeltaPage | None:
    if raw.keys() != _PAGE_KEYS:
        return None
    version, created_at, msg_id, body = raw["v"], raw["created_at"], raw["msg_id"], raw["body"]
    if type(version) is not list or len(version) != 2:
        return None
    major, minor = version
    if (
        type(major) is not int
        or type(minor) is not int
        or major != PROTOCOL_VERSION[0]
        or not 0 <= minor <= PROTOCOL_VERSION[1]  # a newer minor may bring fields to drop
        or type(created_at) is not int
        or not 0 <= created_at <= _MILLIS_MAX
        or type(msg_id) is not str
        or _UUID.fullmatch(msg_id) is None
        or type(body) is not dict
        or body.keys() != _PAGE_BODY_KEYS
    ):
        return None
    request_id, page_no, changes = body["request_id"], body["page_no"], body["changes"]
    if (
        type(request_id) is not str
        or _UUID.fullmatch(request_id) is None
        or type(page_no) is not int
        or not 1 <= page_no <= _PAGE_NO_MAX
        or type(changes) is not list
        or len(changes) > _PAGE_CHANGES_MAX
    ):
        return None
    rows: list[ChangeRow] = []
    add = rows.append
    scopes: set[str] = set()  # scopes already matched (a page has one or two)
    entities = _ENTITY_NAMES
    for change in changes:
        if type(change) is not dict:
            return None
        scope = change["scope"]  # a missing field: KeyError, a doubt
        seq = change["scope_seq"]
        entity = change["entity"]
        key = change["key"]
        op = change["op"]
        version = change["version"]
        state = change.get("state")
        if len(change) != (7 if "state" in change else 6):  # a field we do not know
            return None
        if (
            type(seq) is not int
            or not 0 < seq <= _SEQ_MAX
            or type(version) is not int
            or not 0 < version <= _SEQ_MAX
            or type(key) is not str
            or not 0 < len(key) <= _KEY_MAX
            or type(entity) is not str
            or entity not in entities
            or type(op) is not str
            or (op != "upsert" and op != "delete")
            or type(scope) is not str
        ):
            return None
        if scope not in scopes:
            if _SCOPE.fullmatch(scope) is None:
                return None
            scopes.add(scope)
        if state is not None and (type(state) is not dict or not _clean_state(state, _STATE_DEPTH)):
            return None
        add((scope, seq, entity, key, op, version, state))
    return CheckedDeltaPage((major, minor), created_at, msg_id, request_id, page_no, rows)


def _clean_state(node: dict[Any, Any], depth: int) -> bool:
    """Whether a map at ``depth`` is a valid catalog state (or value): string keys, leaves
    of :data:`_STATE_LEAVES`, nesting within :data:`_MAX_DEPTH` (exact types only).

    A twin of :func:`_clean_map`'s walk with other leaves, kept apart on purpose: giving
    that walk a ``leaves`` parameter (and its key check inline) made a 1,000-item page
    0.35-0.45 ms slower to decode, about 18 %, measured best of 50 on this machine."""
    if depth >= _MAX_DEPTH:
        return False
    leaves = _STATE_LEAVES
    for key, value in node.items():
        if type(key) is not str:
            return False
        kind = type(value)
        if kind in leaves:
            continue
        if kind is dict:
            if not _clean_state(value, depth + 1):
                return False
        elif kind is list:
            if not _clean_state_list(value, depth + 1):
                return False
        else:
            return False
    return True


def _clean_state_list(node: list[Any], depth: int) -> bool:
    if depth >= _MAX_DEPTH:
        return False
    leaves = _STATE_LEAVES
    for value in node:
        kind = type(value)
        if kind in leaves:
            continue
        if kind is dict:
            if not _clean_state(value, depth + 1):
                return False
        elif kind is list:
            if not _clean_state_list(value, depth + 1):
                return False
        else:
            return False
    return True


R = TypeVar("R")
P = ParamSpec("P")


def without_collection(work: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``work(*args, **kwargs)`` with Python's cyclic garbage collector paused (as it was before,
    after: a collector already paused stays paused).

    Decoding makes thousands of containers (a delta page of 1,000 changes: about 12,000
    maps, lists and models) that all stay alive until it returns and form no cycle, so
    every collection the allocations trigger meanwhile scans them for nothing and moves
    them up a generation, where the next scans them again: 1.1 ms of a page's 6.8 ms (a
    reinit of 111 pages, about 0.12 s). Paused, the objects that survive are scanned once,
    by the first collection after. Nothing here runs other code (no callbacks, no I/O),
    so the pause lasts exactly as long as the work.
    """
    if not gc.isenabled():
        return work(*args, **kwargs)
    gc.disable()
    try:
        return work(*args, **kwargs)
    finally:
        gc.enable()


def _decode_kind(data: bytes, max_size: int, base: type[M], types: Mapping[str, type[M]]) -> M:
    return _validate_kind(_unpack(data, max_size), base, types)


def _validate_kind(raw: dict[str, Any], base: type[M], types: Mapping[str, type[M]]) -> M:
    cls = _message_class(raw)
    if not issubclass(cls, base):
        raise UnknownTypeError(
            f"{raw['type']!r} is not a {base.kind} message (expected one of {sorted(types)})",
            field="type",
        )
    return _validate(raw, cls)


def _unpack(data: bytes, max_size: int) -> dict[str, Any]:
    raw = _unpack_only(data, max_size)
    _check_tree(raw)
    return raw


def _unpack_only(data: bytes, max_size: int) -> dict[str, Any]:
    """The top-level map, well-formed MessagePack, its tree not checked yet."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MalformedError(f"expected bytes, got {type(data).__name__}")
    if len(data) > max_size:
        raise TooLargeError(f"message is {len(data)} bytes, the limit is {max_size}")
    if not data:
        raise MalformedError("empty message")
    try:
        raw = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, ext_hook=_refuse_ext
        )
    except ProtocolError:
        raise
    except msgpack.ExtraData:
        raise MalformedError("trailing bytes after the message") from None
    except msgpack.StackError:
        raise MalformedError(f"nesting deeper than {_MAX_DEPTH} levels") from None
    except UnicodeDecodeError:
        raise MalformedError("a string is not valid UTF-8") from None
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise MalformedError(f"not valid MessagePack: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise MalformedError(f"the top level must be a map, not {_wire_type(raw)}")
    return raw


def _refuse_ext(code: int, data: bytes) -> object:
    raise MalformedError(f"MessagePack extension type {code} is not used by the protocol")


def _check_tree(root: dict[str, Any]) -> None:
    """Refuse deep nesting, non-string map keys, timestamps and floats.

    Runs on every message, so first a quick scan that only says whether the tree is clean
    (most are); only a tree it doubts is walked again by :func:`_find_problem`, which
    finds the first problem in the documented order and reports it with its path.
    """
    if not _clean_map(root, 0):
        _find_problem(root)


_SCALARS = frozenset({str, int, bool, bytes, type(None)})
"""What msgpack decodes that the protocol allows as a leaf (floats and timestamps are not)."""


def _clean_map(node: dict[Any, Any], depth: int) -> bool:
    """Whether a map and everything under it passes :func:`_find_problem` (exact types
    only: anything unexpected is left to the slow walk to judge and report)."""
    if depth >= _MAX_DEPTH:
        return False
    return all(type(key) is str for key in node) and _clean_values(node.values(), depth)


def _clean_list(node: list[Any], depth: int) -> bool:
    return depth < _MAX_DEPTH and _clean_values(node, depth)


def _clean_values(values: Iterable[Any], depth: int) -> bool:
    """The values of a map or list at ``depth``: scalars, or containers clean below."""
    for value in values:
        kind = type(value)
        if kind in _SCALARS:
            continue
        if kind is dict:
            if not _clean_map(value, depth + 1):
                return False
        elif kind is list:
            if not _clean_list(value, depth + 1):
                return False
        else:
            return False
    return True


def _find_problem(root: dict[str, Any]) -> None:
    """The walk that reports: without recursion, the path of a node kept as a linked
    ``(parent, key)`` pair and spelled out only when there is an error to report."""
    stack: list[tuple[object, int, _Trail]] = [(root, 0, None)]
    while stack:
        value, depth, trail = stack.pop()
        if isinstance(value, float):
            raise FloatNotAllowedError(
                "floats are never allowed: money is integer minor units, quantities integer "
                "thousandths, rates decimal strings",
                field=field_path(_spell(trail)),
            )
        if isinstance(value, msgpack.Timestamp):
            # msgpack decodes extension -1 itself, without calling ext_hook.
            raise MalformedError(
                "MessagePack extension type -1 (timestamp) is not used by the protocol: "
                "times are integer Unix milliseconds",
                field=field_path(_spell(trail)),
            )
        if not isinstance(value, (dict, list)):
            continue
        if depth >= _MAX_DEPTH:
            raise MalformedError(
                f"nesting deeper than {_MAX_DEPTH} levels", field=field_path(_spell(trail))
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise MalformedError(
                        f"map keys must be strings, not {_wire_type(key)}",
                        field=field_path(_spell(trail)),
                    )
                stack.append((item, depth + 1, (trail, key)))
        else:
            stack.extend((item, depth + 1, (trail, index)) for index, item in enumerate(value))


_Trail = tuple[Any, str | int] | None
"""A node's path as ``(parent trail, key)`` links, root first when spelled out."""


def _spell(trail: _Trail) -> tuple[str | int, ...]:
    parts: list[str | int] = []
    while trail is not None:
        trail, key = trail
        parts.append(key)
    return tuple(reversed(parts))


def _message_class(raw: dict[str, Any]) -> type[Message]:
    version = raw.get("v", _MISSING)
    if version is _MISSING:
        raise MissingFieldError("every message carries its protocol version", field="v")
    if (
        not isinstance(version, list)
        or len(version) != 2
        or not all(type(part) is int and part >= 0 for part in version)
    ):
        raise WrongTypeError(
            "v must be an array of two non-negative integers [major, minor]", field="v"
        )
    if version[0] != PROTOCOL_VERSION[0]:
        raise UnsupportedVersionError(
            f"protocol major version {version[0]} is not supported (this reader speaks "
            f"{PROTOCOL_VERSION[0]}.x)",
            field="v",
        )
    kind = raw.get("type", _MISSING)
    if kind is _MISSING:
        raise MissingFieldError("every message names its type", field="type")
    if not isinstance(kind, str):
        raise WrongTypeError(f"type must be a string, not {_wire_type(kind)}", field="type")
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise UnknownTypeError(f"unknown message type {kind!r}", field="type")
    return cls


def _validate(raw: dict[str, Any], cls: type[M]) -> M:
    newer_minor = raw["v"][1] > PROTOCOL_VERSION[1]
    for _ in range(2):
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            errors = exc.errors(include_url=False)
            unknown = [e for e in errors if e["type"] == "extra_forbidden"]
            if newer_minor and unknown:
                # A newer minor version added fields: drop them and read what we know
                # (from a copy: the caller's data stays as it was).
                raw = copy.deepcopy(raw)
                for error in unknown:
                    _drop(raw, error["loc"])
                newer_minor = False
                continue
            raise _to_protocol_error(errors) from None
    raise AssertionError("unreachable: unknown fields are dropped at most once")


def _drop(raw: dict[str, Any], loc: tuple[int | str, ...]) -> None:
    node: Any = raw
    for part in loc[:-1]:
        node = node[part]
    del node[loc[-1]]


_CODE_BY_PYDANTIC_TYPE = {
    "missing": "missing_field",
    "extra_forbidden": "unknown_field",
    "greater_than": "out_of_range",
    "greater_than_equal": "out_of_range",
    "less_than": "out_of_range",
    "less_than_equal": "out_of_range",
    "too_short": "out_of_range",
    "too_long": "out_of_range",
    "string_too_short": "out_of_range",
    "string_too_long": "out_of_range",
}


def _to_protocol_error(errors: list[Any]) -> ProtocolError:
    error = _most_specific(errors)
    kind: str = error["type"]
    code = _CODE_BY_PYDANTIC_TYPE.get(kind)
    if code is None:
        code = "wrong_type" if kind.endswith("_type") else "invalid_value"
    reason = str(error["msg"])
    loc: list[int | str] = []
    for part in error["loc"]:
        if part == "[key]":
            # pydantic marks an invalid map key by appending "[key]" after the key itself.
            reason = f"invalid map key: {reason}"
        elif _is_union_tag(part):
            reason = (
                "a catalog value must be nil, a boolean, an integer, a string, an array or a map"
            )
        else:
            loc.append(part)
    return protocol_error_for_code(code, reason, field_path(loc))


def _most_specific(errors: list[Any]) -> Any:
    """The first error, or, when it is about one member of a union (a catalog value), the
    deepest error under the same value: a bad leaf deep inside is reported where it is."""
    first = errors[0]
    prefix: list[int | str] = []
    for part in first["loc"]:
        if _is_union_tag(part):
            break
        prefix.append(part)
    else:
        return first
    same_value = [e for e in errors if list(e["loc"][: len(prefix)]) == prefix]
    return max(same_value, key=lambda e: len(e["loc"]))


def _is_union_tag(part: int | str) -> bool:
    # pydantic names union members in locations ("int", "list[...]"); they are not fields.
    return isinstance(part, str) and (
        part in {"bool", "int", "str", "none"} or ("[" in part and part != "[key]")
    )


def field_path(loc: tuple[int | str, ...] | list[int | str]) -> str:
    """Format a location as a field path: ``("body", "lines", 3, "unit_price")`` →
    ``body.lines[3].unit_price``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _wire_type(value: object) -> str:
    return {
        dict: "a map",
        list: "an array",
        str: "a string",
        bytes: "binary",
        int: "an integer",
        bool: "a boolean",
        type(None): "nil",
    }.get(type(value), type(value).__name__)
