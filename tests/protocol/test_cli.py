"""``tillsync-protocol decode``, run as the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .vectors import load

VALID = {vector["name"]: vector for vector in load("valid")}
INVALID = {vector["name"]: vector for vector in load("invalid")}


def _script() -> str:
    beside = Path(sys.executable).parent / "tillsync-protocol"
    found = str(beside) if beside.exists() else shutil.which("tillsync-protocol")
    assert found, "the tillsync-protocol console script is not installed"
    return found


def run(*args: str, stdin: bytes = b"") -> tuple[int, dict[str, Any], str]:
    done = subprocess.run(
        [_script(), "decode", *args], input=stdin, capture_output=True, timeout=60, check=False
    )
    output = json.loads(done.stdout) if done.stdout.strip() else {}
    return done.returncode, output, done.stderr.decode()


def test_decodes_a_hex_argument() -> None:
    vector = VALID["receipt_czk_vat"]
    code, output, _ = run(vector["hex"])
    assert code == 0
    assert output == {"ok": True, "message": vector["decoded"]}


def test_decodes_raw_bytes_from_a_file(tmp_path: Path) -> None:
    vector = VALID["shift_close_z_report"]
    path = tmp_path / "dead-letter.msgpack"
    path.write_bytes(bytes.fromhex(vector["hex"]))
    code, output, _ = run(f"@{path}")
    assert code == 0
    assert output["message"] == vector["decoded"]


def test_decodes_raw_bytes_from_stdin() -> None:
    vector = VALID["heartbeat_full"]
    code, output, _ = run(stdin=bytes.fromhex(vector["hex"]))
    assert code == 0
    assert output["message"] == vector["decoded"]


def test_decodes_hex_text_from_stdin_with_a_dash() -> None:
    vector = VALID["ack_with_rejections"]
    code, output, _ = run("-", stdin=vector["hex"].encode() + b"\n")
    assert code == 0
    assert output["message"] == vector["decoded"]


def test_keeps_non_ascii_text_readable() -> None:
    code, output, _ = run(VALID["receipt_czk_vat"]["hex"])
    assert code == 0
    assert output["message"]["body"]["lines"][0]["name"] == "Káva zrnková 250 g"


def test_garbage_exits_1_with_a_structured_error() -> None:
    code, output, _ = run("--raw", stdin=b"\xc1 this is not a message")
    assert code == 1
    assert output["ok"] is False
    assert set(output["error"]) == {"code", "field", "reason"}
    assert output["error"]["code"] == "malformed"


@pytest.mark.parametrize("name", ["float_money", "unsupported_major_2", "invalid_rate_comma"])
def test_invalid_vectors_report_their_code_and_field(name: str) -> None:
    vector = INVALID[name]
    code, output, _ = run(vector["hex"])
    assert code == 1
    assert {k: output["error"][k] for k in ("code", "field")} == vector["error"]
    assert output["error"]["reason"]


def test_bad_hex_is_a_malformed_error() -> None:
    code, output, _ = run("zz-not-hex")
    assert code == 1
    assert output["error"]["code"] == "malformed"
    assert "hex" in output["error"]["reason"]


def test_max_size_option_is_honoured() -> None:
    code, output, _ = run("--max-size", "16", VALID["void"]["hex"])
    assert code == 1
    assert output["error"]["code"] == "too_large"


def test_missing_file_is_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    code, output, stderr = run(f"@{tmp_path / 'absent.msgpack'}")
    assert code == 2
    assert output == {}
    assert "absent.msgpack" in stderr
    assert "Traceback" not in stderr
