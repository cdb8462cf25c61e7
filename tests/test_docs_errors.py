"""docs/errors.md names every error code the three packages can produce.

Codes are collected two ways, so that neither a new error class nor a new ``code="…"``
override can slip past the documentation:

* every ``TillsyncError`` subclass defined in ``tillsync_protocol``, ``tillsync_agent`` or
  ``tillsync_central``, found by importing every module of the three packages and walking
  ``TillsyncError.__subclasses__()`` recursively;
* every code written literally in their source: ``code="…"`` keyword arguments (also both
  branches of ``code="a" if … else "b"``), ``code = "…"`` in a class body, and
  ``{"code": "…"}`` in dict literals (the agent's socket and CLI build errors that way).

A code is documented when it is backticked in the first cell of a table row of
``docs/errors.md`` or in one of its headings.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from collections import defaultdict
from pathlib import Path
from types import ModuleType

import pytest

import tillsync_agent
import tillsync_central
import tillsync_protocol
from tillsync_protocol import TillsyncError

ROOT = Path(__file__).resolve().parent.parent
ERRORS_MD = ROOT / "docs" / "errors.md"
PACKAGES: tuple[ModuleType, ...] = (tillsync_protocol, tillsync_agent, tillsync_central)
PACKAGE_NAMES = tuple(package.__name__ for package in PACKAGES)


def import_all_modules() -> None:
    for package in PACKAGES:
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            importlib.import_module(info.name)


def error_classes() -> list[type[TillsyncError]]:
    """``TillsyncError`` and every subclass the three packages define."""
    found: list[type[TillsyncError]] = []
    stack: list[type[TillsyncError]] = [TillsyncError]
    while stack:
        cls = stack.pop()
        if cls.__module__.split(".")[0] in PACKAGE_NAMES and cls not in found:
            found.append(cls)
        stack.extend(cls.__subclasses__())
    return found


def _strings(node: ast.expr) -> list[str]:
    """The string constants an expression can evaluate to, when it is literal."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        return _strings(node.body) + _strings(node.orelse)
    return []


def literal_codes(tree: ast.AST) -> list[tuple[str, int]]:
    """``(code, line)`` of every code written literally in a parsed module."""
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "code":
            found.extend((code, node.value.lineno) for code in _strings(node.value))
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant) and key.value == "code":
                    found.extend((code, value.lineno) for code in _strings(value))
        elif isinstance(node, ast.ClassDef):
            for statement in node.body:
                if isinstance(statement, ast.Assign):
                    targets, value = statement.targets, statement.value
                elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
                    targets, value = [statement.target], statement.value
                else:
                    continue
                if any(isinstance(t, ast.Name) and t.id == "code" for t in targets):
                    found.extend((code, statement.lineno) for code in _strings(value))
    return found


def codes_in_code() -> dict[str, list[str]]:
    """Every code the packages can produce, with where each comes from."""
    import_all_modules()
    origins: dict[str, list[str]] = defaultdict(list)
    for cls in error_classes():
        origins[cls.code].append(f"class {cls.__module__}.{cls.__qualname__}")
    for package in PACKAGES:
        for folder in package.__path__:
            for path in sorted(Path(folder).rglob("*.py")):
                tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
                where = path.relative_to(ROOT)
                for code, line in literal_codes(tree):
                    origins[code].append(f"{where}:{line}")
    return dict(origins)


def documented_codes(text: str) -> set[str]:
    """Codes backticked in the first cell of a table row, or in a heading."""
    codes: set[str] = set()
    for line in text.splitlines():
        if line.startswith("|"):
            cells = re.split(r"(?<!\\)\|", line.strip())
            if len(cells) > 2:
                codes.update(re.findall(r"`([^`]+)`", cells[1]))
        elif re.match(r"^#{1,6} ", line):
            codes.update(re.findall(r"`([^`]+)`", line))
    return codes


CODES = codes_in_code()
DOCUMENTED = documented_codes(ERRORS_MD.read_text(encoding="utf-8"))


def test_the_collector_finds_codes_of_every_kind() -> None:
    # A class code of each package, overrides given as code="…", a dead-letter code given
    # to a dataclass, a conditional override and a dict literal of the agent.
    for code in (
        "malformed",
        "store_locked",
        "database_unavailable",
        "invalid_routing_key",
        "delivery_limit",
        "migration_unknown",
        "register_exists",
    ):
        assert code in CODES, code


def test_literal_codes_reads_every_form() -> None:
    source = (
        'f(code="a")\n'
        'g(reason="x", code="b" if ok else "c")\n'
        'h({"code": "d", "field": ""})\n'
        'class E:\n    code = "e"\n'
        "i(code=variable)\n"
    )
    assert sorted(code for code, _ in literal_codes(ast.parse(source))) == list("abcde")


def test_documented_codes_reads_table_rows_and_headings_only() -> None:
    text = "| `a` | `X` |\n| --- | --- |\n### `b`\nprose `c`\n| x | `d` |\n"
    assert documented_codes(text) == {"a", "b"}


@pytest.mark.parametrize("code", sorted(CODES))
def test_every_code_is_documented(code: str) -> None:
    assert code in DOCUMENTED, (
        f"error code {code!r} (from {', '.join(CODES[code])}) is not in docs/errors.md: "
        "add a table row or a heading for it, with where it appears and what to do"
    )
