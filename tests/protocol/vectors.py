"""The golden vectors and the generator script, as the protocol tests load them."""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "protocol" / "vectors"


def load(kind: str) -> list[dict[str, Any]]:
    """Every vector of ``kind`` (``valid`` or ``invalid``), sorted by name."""
    found = [json.loads(p.read_text(encoding="utf-8")) for p in (VECTORS / kind).glob("*.json")]
    return sorted(found, key=lambda vector: vector["name"])


@cache
def generator() -> ModuleType:
    """``protocol/vectors/generate.py`` imported as a module (it is a plain script)."""
    spec = importlib.util.spec_from_file_location(
        "tillsync_vectors_generate", VECTORS / "generate.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
