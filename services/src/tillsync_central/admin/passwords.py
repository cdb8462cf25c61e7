"""Operator passwords: scrypt with a random salt per operator, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import secrets

__all__ = ["MIN_PASSWORD_LENGTH", "hash_password", "verify_password"]

MIN_PASSWORD_LENGTH = 8
SALT_BYTES = 16
# n=2**14, r=8 (16 MiB, ~50 ms here): the interactive-login parameters of the scrypt paper.
_N, _R, _P, _LEN = 2**14, 8, 1, 32


def _scrypt(password: str, salt: bytes) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=_LEN, maxmem=64 * 2**20
    )


def hash_password(password: str) -> tuple[bytes, bytes]:
    """A new random salt and the password's hash under it."""
    salt = secrets.token_bytes(SALT_BYTES)
    return salt, _scrypt(password, salt)


def verify_password(password: str, salt: bytes, expected: bytes) -> bool:
    """True when ``password`` hashes to ``expected`` under ``salt`` (constant-time)."""
    return hmac.compare_digest(_scrypt(password, salt), expected)
