"""Checking answers of the local API against its OpenAPI document, by hand (no jsonschema
here): types, required keys, enums, ``$ref``, ``allOf`` and ``oneOf`` — what
:mod:`tillsync_agent.openapi` uses."""

from __future__ import annotations

import re
from typing import Any

from tillsync_agent.openapi import OPENAPI

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "null": (type(None),),
}


def _resolve(ref: str) -> dict[str, Any]:
    node: Any = OPENAPI
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


def validate(value: Any, schema: dict[str, Any], where: str = "$") -> None:
    """Raise AssertionError naming the first place ``value`` does not match ``schema``."""
    if "$ref" in schema:
        validate(value, _resolve(schema["$ref"]), where)
        return
    for part in schema.get("allOf", []):
        validate(value, part, where)
    if "oneOf" in schema:
        matches = 0
        for option in schema["oneOf"]:
            try:
                validate(value, option, where)
                matches += 1
            except AssertionError:
                pass
        assert matches >= 1, f"{where}: matches none of oneOf: {value!r}"
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(value, _TYPES[name]) and not (name == "integer" and isinstance(value, bool))
            for name in names
        )
        assert ok, f"{where}: {value!r} is not {names}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        for key in schema.get("required", []):
            assert key in value, f"{where}: missing {key!r} in {sorted(value)}"
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate(value[key], sub, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{index}]")


def operation(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The path template and operation of the document that a real ``path`` matches."""
    for template, operations in OPENAPI["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, path) and method.lower() in operations:
            return template, operations[method.lower()]
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def check_response(method: str, path: str, status: int, body: Any) -> str:
    """Check one real answer; returns the path template it matched."""
    template, op = operation(method, path)
    responses = op["responses"]
    assert str(status) in responses, f"{method} {template}: status {status} not documented"
    response = responses[str(status)]
    if "$ref" in response:
        response = _resolve(response["$ref"])
    schema = response["content"]["application/json"]["schema"]
    validate(body, schema, f"{method} {template} {status}")
    return template
