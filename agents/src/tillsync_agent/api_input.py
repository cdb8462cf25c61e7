"""Reading the local API's requests: JSON bodies (bounded), documents, entities and query
parameters, each refused with the protocol's error codes and the field concerned."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from tillsync_protocol import (
    ENTITIES,
    InvalidValueError,
    MalformedError,
    MissingFieldError,
    OutOfRangeError,
    TooLargeError,
    WrongTypeError,
)

__all__ = ["MAX_BODY", "document_of", "entities_of", "entity_of", "int_param", "read_json"]

MAX_BODY = 16 * 1024 * 1024
"""Bytes in one request body."""


async def read_json(request: Request, empty: Any = None) -> Any:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise TooLargeError(f"the request body is over {MAX_BODY} bytes", field="")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip() and empty is not None:
        return empty
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise MalformedError(f"the request body is not JSON: {exc}", field="") from None
    if empty is not None and not isinstance(value, dict):
        raise WrongTypeError("the request body is a JSON object", field="")
    return value


def document_of(payload: Any) -> tuple[str, dict[str, Any]]:
    if not isinstance(payload, dict):
        raise WrongTypeError("a document is a JSON object {type, body}", field="")
    doc_type, body = payload.get("type"), payload.get("body")
    if not isinstance(doc_type, str):
        raise MissingFieldError("a document needs its type (a string)", field="type")
    if not isinstance(body, dict):
        raise MissingFieldError("a document needs its body (an object)", field="body")
    return doc_type, body


def entity_of(request: Request) -> str:
    entity = str(request.path_params["entity"])
    if entity not in ENTITIES:
        raise InvalidValueError(
            f"unknown catalog entity {entity!r}; known: {', '.join(ENTITIES)}", field="entity"
        )
    return entity


def entities_of(options: dict[str, Any]) -> list[str] | None:
    entities = options.get("entities")
    if entities is None:
        return None
    if not isinstance(entities, list) or not all(isinstance(e, str) for e in entities):
        raise WrongTypeError("entities is a list of entity names", field="entities")
    return entities


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise WrongTypeError(f"{name} is an integer", field=name) from None
    if not low <= value <= high:
        raise OutOfRangeError(f"{name} is from {low} to {high}", field=name)
    return value
