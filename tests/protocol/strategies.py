"""Hypothesis strategies for every protocol model, built by walking the models.

``from_type`` does not honour pydantic's constraints (patterns, bounds, strictness), so
this walks ``model_fields`` and the annotated-types metadata itself: a new field or a
new constraint is picked up without editing this file.
"""

from __future__ import annotations

import re
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from hypothesis import assume
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from tillsync_protocol import PROTOCOL_VERSION
from tillsync_protocol.control import CatalogValue

SMALL = 4
"""Longest generated list or map when the model allows more: keeps examples fast."""


def for_model(cls: type[BaseModel]) -> st.SearchStrategy[Any]:
    """Valid instances of ``cls``: every field honours its constraints."""
    return _models(cls)


# (low, high) field pairs that protocol models require in order (``require_ordered``).
_ORDERED_PAIRS = (("first", "last"), ("from_seq", "to_seq"), ("first_seq", "last_seq"))


def _models(cls: type[BaseModel]) -> st.SearchStrategy[Any]:
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, info in cls.model_fields.items():
        if name == "v":
            strategy: st.SearchStrategy[Any] = st.tuples(
                st.just(PROTOCOL_VERSION[0]), st.integers(0, 65535)
            ).map(list)
        else:
            strategy = _for(info.annotation, info.metadata)
        (required if info.is_required() else optional)[name] = strategy

    @st.composite
    def build(draw: st.DrawFn) -> Any:
        values = draw(st.fixed_dictionaries(required, optional=optional))
        for low, high in _ORDERED_PAIRS:
            # Inclusive ranges must not be reversed: order the two drawn ends.
            if low in values and high in values and values[low] > values[high]:
                values[low], values[high] = values[high], values[low]
        try:
            return cls.model_validate(values)
        except ValidationError:
            # Only cross-field rules fail here (an item edit must change something).
            assume(False)

    return build()


def _for(tp: Any, metadata: list[Any]) -> st.SearchStrategy[Any]:
    constraints = _flatten(metadata)
    if tp is CatalogValue:
        return _catalog_values()
    origin = get_origin(tp)
    if origin is Annotated:
        base, *extra = get_args(tp)
        return _for(base, [*constraints, *extra])
    if origin in (Union, types.UnionType):
        return st.one_of([_for(member, constraints) for member in get_args(tp)])
    if origin is Literal:
        return st.sampled_from(get_args(tp))
    if origin is list:
        (item,) = get_args(tp)
        low, high = _lengths(constraints)
        return st.lists(_for(item, []), min_size=low, max_size=max(low, min(high, SMALL)))
    if origin is dict:
        key, value = get_args(tp)
        low, high = _lengths(constraints)
        return st.dictionaries(
            _for(key, []), _for(value, []), min_size=low, max_size=max(low, min(high, SMALL))
        )
    if tp is type(None):
        return st.none()
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return st.deferred(lambda: _models(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return _integers(constraints)
    if tp is str:
        return _strings(constraints)
    raise TypeError(f"no strategy for {tp!r}")


def _flatten(metadata: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in metadata:
        if isinstance(item, FieldInfo):
            out.extend(_flatten(item.metadata))
        else:
            out.append(item)
    return out


def _lengths(constraints: list[Any]) -> tuple[int, int]:
    low, high = 0, 10**9
    for item in constraints:
        if isinstance(item, annotated_types.MinLen):
            low = item.min_length
        elif isinstance(item, annotated_types.MaxLen):
            high = item.max_length
    return low, high


def _integers(constraints: list[Any]) -> st.SearchStrategy[int]:
    low: int | None = None
    high: int | None = None
    for item in constraints:
        if isinstance(item, annotated_types.Ge):
            low = int(item.ge)  # type: ignore[call-overload]
        elif isinstance(item, annotated_types.Gt):
            low = int(item.gt) + 1  # type: ignore[call-overload]
        elif isinstance(item, annotated_types.Le):
            high = int(item.le)  # type: ignore[call-overload]
        elif isinstance(item, annotated_types.Lt):
            high = int(item.lt) - 1  # type: ignore[call-overload]
    # Without bounds MessagePack still caps integers at 64 bits.
    low = -(2**63) if low is None else low
    high = 2**64 - 1 if high is None else high
    edges = st.sampled_from(sorted({low, high, max(low, min(high, 0))}))
    return st.one_of(st.integers(low, high), edges)


def _strings(constraints: list[Any]) -> st.SearchStrategy[str]:
    low, high = _lengths(constraints)
    pattern = next(
        (getattr(item, "pattern", None) for item in constraints if hasattr(item, "pattern")), None
    )
    if pattern is None:
        return st.text(min_size=low, max_size=max(low, min(high, 20)))
    # pydantic matches patterns with Rust regex semantics, where "$" is the very end; in
    # Python it may precede a final newline, so match the unanchored body in full instead.
    body = re.sub(r"^\^|\$$", "", pattern)
    return st.from_regex(body, fullmatch=True).filter(lambda s: low <= len(s) <= high)


def _catalog_values() -> st.SearchStrategy[Any]:
    leaves = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10)
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=10,
    )


def msgpack_values() -> st.SearchStrategy[Any]:
    """Anything MessagePack can carry, floats, binary and odd keys included."""
    leaves = (
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats(allow_nan=True)
        | st.text(max_size=10)
        | st.binary(max_size=10)
    )
    keys = st.text(max_size=8) | st.binary(max_size=4) | st.integers(-5, 5)
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
        max_leaves=20,
    )


def paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (map keys and list indexes) to a node under ``node``, for a test that
    breaks a drawn message at any one place."""
    found = [path] if path else []
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else ()
    )
    for key, child in children:
        found += paths(child, (*path, key))
    return found
