"""Rewrite the generated artefacts of protocol v1, deterministically.

    uv run python protocol/vectors/generate.py          # the vectors (default)
    uv run python protocol/vectors/generate.py --write-definitions
                                # deploy/rabbitmq/definitions.json
    uv run python protocol/vectors/generate.py --docs   # field tables of docs/protocol.md
    uv run python protocol/vectors/generate.py --all    # all three

Every output is a pure function of the library: running it twice changes nothing, and
the tests compare the committed files with what this script would write.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tillsync_protocol import (
    MAX_BATCH_DOCUMENTS,
    MAX_MESSAGE_SIZE,
    ProtocolError,
    decode,
    encode,
    split_batch,
    to_json,
)
from tillsync_protocol.topology import definitions

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
# A plain script beside its helper modules: make them importable however it is started.
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from batch_vectors import BatchCase, batch_cases  # noqa: E402
from field_tables import fields_section  # noqa: E402
from invalid_vectors import InvalidCase, invalid_cases  # noqa: E402
from valid_vectors import ValidCase, valid_cases  # noqa: E402

VALID_DIR = HERE / "valid"
INVALID_DIR = HERE / "invalid"
BATCH_DIR = HERE / "batch"
DEFINITIONS_FILE = ROOT / "deploy" / "rabbitmq" / "definitions.json"
PROTOCOL_DOC = ROOT / "docs" / "protocol.md"
FIELDS_BEGIN = "<!-- fields:begin -->"
FIELDS_END = "<!-- fields:end -->"


def dumps(document: object) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def valid_document(case: ValidCase) -> dict[str, Any]:
    message = decode(case.data)
    reencoded = encode(message)
    if case.canonical != (reencoded == case.data):
        raise SystemExit(f"{case.name}: canonical={case.canonical} but re-encoding disagrees")
    out: dict[str, Any] = {"name": case.name, "description": case.description}
    if not case.canonical:
        out["canonical"] = False
    out["hex"] = case.data.hex()
    out["decoded"] = to_json(message)
    return out


def invalid_document(case: InvalidCase) -> dict[str, Any]:
    try:
        decode(case.data, max_size=case.max_size or MAX_MESSAGE_SIZE)
    except ProtocolError as exc:
        if (exc.code, exc.field) != (case.code, case.field):
            raise SystemExit(
                f"{case.name}: expected {case.code} at {case.field!r}, "
                f"the library says {exc.code} at {exc.field!r} ({exc.reason})"
            ) from None
    else:
        raise SystemExit(f"{case.name}: decoded without error")
    out: dict[str, Any] = {"name": case.name, "description": case.description}
    if case.max_size is not None:
        out["max_size"] = case.max_size
    out["hex"] = case.data.hex()
    out["error"] = {"code": case.code, "field": case.field}
    return out


def batch_document(case: BatchCase) -> dict[str, Any]:
    limit = case.max_documents or MAX_BATCH_DOCUMENTS
    out: dict[str, Any] = {"name": case.name, "description": case.description}
    if case.max_documents is not None:
        out["max_documents"] = case.max_documents
    out["hex"] = case.data.hex()
    try:
        documents = split_batch(case.data, max_documents=limit)
    except ProtocolError as exc:
        if case.documents is not None or (exc.code, exc.field) != (case.code, case.field):
            raise SystemExit(
                f"{case.name}: the library says {exc.code} at {exc.field!r} ({exc.reason})"
            ) from None
        out["error"] = {"code": case.code, "field": case.field}
        return out
    if documents != case.documents:
        raise SystemExit(f"{case.name}: split into other documents than expected")
    for document in documents:
        decode(document)  # every document of a valid batch is itself valid
    out["documents"] = [document.hex() for document in documents]
    return out


def vector_files() -> dict[Path, str]:
    """Every vector file, by path, with the text it must hold."""
    files: dict[Path, str] = {}
    for case in valid_cases():
        files[VALID_DIR / f"{case.name}.json"] = dumps(valid_document(case))
    for bad in invalid_cases():
        files[INVALID_DIR / f"{bad.name}.json"] = dumps(invalid_document(bad))
    for batch in batch_cases():
        files[BATCH_DIR / f"{batch.name}.json"] = dumps(batch_document(batch))
    if len(files) != len(valid_cases()) + len(invalid_cases()) + len(batch_cases()):
        raise SystemExit("two vectors share a name")
    return files


def definitions_text() -> str:
    return dumps(definitions())


def docs_text(current: str) -> str:
    """``current`` with the part between the field markers regenerated."""
    start = current.index(FIELDS_BEGIN) + len(FIELDS_BEGIN)
    end = current.index(FIELDS_END)
    return current[:start] + "\n" + fields_section() + "\n" + current[end:]


def write_vectors() -> None:
    files = vector_files()
    for folder in (VALID_DIR, INVALID_DIR, BATCH_DIR):
        folder.mkdir(exist_ok=True)
        for stale in folder.glob("*.json"):
            if stale not in files:
                stale.unlink()
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    print(f"wrote {len(files)} vectors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write-definitions", action="store_true", help="rewrite definitions.json")
    parser.add_argument("--docs", action="store_true", help="rewrite the field tables of the docs")
    parser.add_argument("--all", action="store_true", help="vectors, definitions and docs")
    args = parser.parse_args(argv)
    only_vectors = not (args.write_definitions or args.docs)
    if args.all or only_vectors:
        write_vectors()
    if args.all or args.write_definitions:
        DEFINITIONS_FILE.write_text(definitions_text(), encoding="utf-8")
        print(f"wrote {DEFINITIONS_FILE.relative_to(ROOT)}")
    if args.all or args.docs:
        PROTOCOL_DOC.write_text(docs_text(PROTOCOL_DOC.read_text(encoding="utf-8")), "utf-8")
        print(f"wrote the field tables of {PROTOCOL_DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
