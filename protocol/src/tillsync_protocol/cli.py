"""``tillsync-protocol decode``: bytes or hex in, readable JSON (or the structured error) out.

Operators use it on dead letters. Kept on argparse so the protocol package has no
dependency beyond msgpack and pydantic.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .codec import MAX_MESSAGE_SIZE, decode, to_json
from .errors import ProtocolError

__all__ = ["main"]


def _read_input(source: str | None, is_hex: bool | None) -> bytes:
    if source is None or source == "-":
        data = sys.stdin.buffer.read()
    elif source.startswith("@"):
        with open(source[1:], "rb") as handle:
            data = handle.read()
    else:
        data = source.encode()
        is_hex = True if is_hex is None else is_hex
    if is_hex is None:
        # Auto-detect: text made only of hex digits and whitespace is hex.
        stripped = bytes(data).strip()
        is_hex = bool(stripped) and all(c in b"0123456789abcdefABCDEF \n\r\t" for c in stripped)
    if is_hex:
        return bytes.fromhex(data.decode("ascii", errors="replace").replace(" ", "").strip())
    return data


def _decode_command(args: argparse.Namespace) -> int:
    try:
        data = _read_input(args.input, True if args.hex else (False if args.raw else None))
    except ValueError as exc:
        print(
            json.dumps(
                {
                    "ok": False,
                    "error": {"code": "malformed", "field": "", "reason": f"bad hex: {exc}"},
                }
            )
        )
        return 1
    except OSError as exc:
        # Not a message problem: the operator named a file that cannot be read.
        print(f"tillsync-protocol: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    try:
        message = decode(data, max_size=args.max_size)
    except ProtocolError as exc:
        print(json.dumps({"ok": False, "error": exc.to_dict()}, indent=2))
        return 1
    print(json.dumps({"ok": True, "message": to_json(message)}, indent=2, ensure_ascii=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tillsync-protocol", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    dec = sub.add_parser("decode", help="decode one message (hex argument, @file, or stdin)")
    dec.add_argument(
        "input", nargs="?", help="hex string, @path to a file, or - / nothing for stdin"
    )
    mode = dec.add_mutually_exclusive_group()
    mode.add_argument("--hex", action="store_true", help="input is hex text")
    mode.add_argument("--raw", action="store_true", help="input is raw MessagePack bytes")
    dec.add_argument("--max-size", type=int, default=MAX_MESSAGE_SIZE)
    dec.set_defaults(func=_decode_command)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
