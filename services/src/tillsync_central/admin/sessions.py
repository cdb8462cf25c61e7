"""Operator sessions: a random token held by the browser (cookie) or a client (bearer),
stored only as its SHA-256, with an expiry; and the CSRF token derived from it.

The CSRF token is an HMAC of the session token, so it needs no storage and only a page
served to that session knows it; the session cookie itself is ``HttpOnly`` and
``SameSite=Strict``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import asyncpg

from .operators import Operator

__all__ = [
    "COOKIE_NAME",
    "Session",
    "create_session",
    "csrf_token",
    "delete_session",
    "find_session",
    "token_hash",
]

COOKIE_NAME = "tillsync_session"
SessionKind = Literal["cookie", "token"]

_INSERT = """
INSERT INTO operator_sessions (token_hash, username, expires_at, kind)
VALUES ($1, $2, now() + $3::interval, $4)
"""
_FIND = """
SELECT o.username, o.role, o.created_at, o.disabled_at, s.kind
FROM operator_sessions s JOIN operators o USING (username)
WHERE s.token_hash = $1 AND s.expires_at > now() AND o.disabled_at IS NULL
"""
_DELETE = "DELETE FROM operator_sessions WHERE token_hash = $1"
_PURGE = "DELETE FROM operator_sessions WHERE expires_at < now() - interval '1 day'"


@dataclass(frozen=True)
class Session:
    operator: Operator
    token: str
    kind: SessionKind

    @property
    def csrf(self) -> str:
        return csrf_token(self.token)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def csrf_token(token: str) -> str:
    """The CSRF token of a session (what forms and ``X-CSRF-Token`` must carry)."""
    return hmac.new(token.encode("utf-8"), b"tillsync-csrf", hashlib.sha256).hexdigest()


async def create_session(
    pool: asyncpg.Pool, operator: Operator, lifetime: timedelta, kind: SessionKind
) -> Session:
    token = secrets.token_urlsafe(32)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_PURGE)
        await conn.execute(_INSERT, token_hash(token), operator.username, lifetime, kind)
    return Session(operator, token, kind)


async def find_session(pool: asyncpg.Pool, token: str) -> Session | None:
    row = await pool.fetchrow(_FIND, token_hash(token))
    if row is None:
        return None
    operator = Operator(row["username"], row["role"], row["created_at"], row["disabled_at"])
    return Session(operator, token, row["kind"])


async def delete_session(pool: asyncpg.Pool, token: str) -> None:
    await pool.execute(_DELETE, token_hash(token))
