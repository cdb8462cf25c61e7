"""docs/protocol.md and docs/errors.md document exactly what the library implements."""

from __future__ import annotations

import re

import pytest

from tillsync_protocol import MESSAGE_TYPES, PROTOCOL_ERROR_CODES, errors
from tillsync_protocol.errors import TillsyncError, protocol_error_for_code

from .vectors import ROOT, generator

PROTOCOL = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
ERRORS = (ROOT / "docs" / "errors.md").read_text(encoding="utf-8")
INGEST_CODES = {"unknown_register", "identity_mismatch", "missing_user_id", "conflict"}


def section(text: str, heading: str) -> str:
    """The text under ``heading`` (a whole heading line) up to the next heading of its
    level or a higher one."""
    level = len(heading.split(" ")[0])
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(rf"^#{{1,{level}}} ", text[start:], flags=re.MULTILINE)
    return text[start : start + following.start()] if following else text[start:]


def table_rows(text: str) -> list[list[str]]:
    """Cells of every markdown table row in ``text`` (header and rule lines excluded)."""
    rows = []
    for line in text.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(cells)
    return [row for row in rows if row[0] not in {"field", "code", "type", "bytes"}]


def ticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def type_headings() -> list[str]:
    return re.findall(r"^### `([a-z_]+)`$", PROTOCOL, flags=re.MULTILINE)


def test_every_message_type_has_exactly_one_heading() -> None:
    headings = type_headings()
    assert len(headings) == len(set(headings))
    assert set(headings) == set(MESSAGE_TYPES)


def test_routing_table_covers_exactly_the_message_types() -> None:
    overview = section(PROTOCOL, "## Overview: two flows")
    listed = [name for row in table_rows(overview) for name in ticked(row[0])]
    assert sorted(listed) == sorted(MESSAGE_TYPES)
    for row in table_rows(overview):
        kind = row[1]
        for name in ticked(row[0]):
            assert MESSAGE_TYPES[name].kind == kind


@pytest.mark.parametrize("type_name", sorted(MESSAGE_TYPES))
def test_each_type_section_tables_every_field(type_name: str) -> None:
    cls = MESSAGE_TYPES[type_name]
    text = section(PROTOCOL, f"### `{type_name}`")
    envelope, body = text.split("`body` (", 1)
    assert [ticked(row[0])[0] for row in table_rows(envelope)] == list(cls.model_fields)
    body_cls = cls.model_fields["body"].annotation
    assert body_cls is not None
    assert [ticked(row[0])[0] for row in table_rows(body)] == list(body_cls.model_fields)


def test_protocol_error_table_lists_every_code_with_its_class() -> None:
    rows = table_rows(section(PROTOCOL, "## Errors"))
    documented = {ticked(row[0])[0]: ticked(row[1])[0] for row in rows if len(row) == 3}
    assert set(documented) == set(PROTOCOL_ERROR_CODES)
    for code, class_name in documented.items():
        assert type(protocol_error_for_code(code, "x")).__name__ == class_name


def test_errors_md_lists_every_code_of_the_system() -> None:
    rows = table_rows(ERRORS)
    documented = {ticked(row[0])[0]: row for row in rows}
    library_codes = {
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, TillsyncError)
    }
    assert library_codes - {"error", "protocol_error"} <= set(documented)
    assert set(documented) >= INGEST_CODES
    classes_by_name = {cls.__name__: cls for cls in _all_error_classes()}
    for code, row in documented.items():
        class_name = ticked(row[1])[0]
        cls = getattr(errors, class_name, None) or classes_by_name.get(class_name)
        assert cls is not None, f"{code} is documented with {class_name}, which does not exist"
        assert issubclass(cls, TillsyncError)
        explicit = re.search(r"\(code `([a-z_]+)`\)", row[1])
        if code not in INGEST_CODES - {"conflict"}:
            expected = explicit.group(1) if explicit else cls.code
            assert expected == code, f"{code} is documented with {class_name}"


def _all_error_classes() -> list[type[TillsyncError]]:
    """Every TillsyncError subclass of the three packages (their modules imported first)."""
    import importlib
    import pkgutil

    for package_name in ("tillsync_protocol", "tillsync_agent", "tillsync_central"):
        package = importlib.import_module(package_name)
        for module in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            importlib.import_module(module.name)
    found: list[type[TillsyncError]] = []
    pending: list[type[TillsyncError]] = [TillsyncError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


def test_protocol_md_names_the_ingest_codes() -> None:
    errors_section = section(PROTOCOL, "## Errors")
    for code in INGEST_CODES:
        assert f"`{code}`" in errors_section


def test_generated_field_tables_are_up_to_date() -> None:
    assert generator().docs_text(PROTOCOL) == PROTOCOL, (
        "rerun: uv run python protocol/vectors/generate.py --docs"
    )


def test_worked_example_hex_is_a_valid_vector() -> None:
    example = section(PROTOCOL, "## Worked example")
    block = example.split("```\n", 2)[1]
    data = bytes.fromhex(block.replace("\n", ""))
    vector = (ROOT / "protocol" / "vectors" / "valid" / "shift_open.json").read_text()
    assert data.hex() in vector
