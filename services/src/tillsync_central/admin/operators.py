"""Operators of the dashboard and their roles: ``administrator`` (everything, operators
too), ``supervisor`` (catalog edits, reinit commands, dead letters), ``viewer``
(read-only)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg

from tillsync_protocol import InvalidValueError

from .errors import AdminError
from .passwords import MIN_PASSWORD_LENGTH, hash_password, verify_password

__all__ = [
    "ROLES",
    "Operator",
    "Role",
    "add_operator",
    "authenticate",
    "check_role",
    "list_operators",
    "role_allows",
]

Role = Literal["administrator", "supervisor", "viewer"]
ROLES: tuple[Role, ...] = ("viewer", "supervisor", "administrator")
"""Least to most: a role may do what every role before it may."""

_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")

_INSERT = """
INSERT INTO operators (username, role, password_salt, password_hash) VALUES ($1, $2, $3, $4)
ON CONFLICT (username) DO NOTHING
RETURNING username, role, created_at, disabled_at
"""
_LIST = "SELECT username, role, created_at, disabled_at FROM operators ORDER BY username"
_CREDENTIALS = """
SELECT username, role, created_at, disabled_at, password_salt, password_hash
FROM operators WHERE username = $1
"""
# A fixed salt and hash: an unknown username costs one scrypt too, so timing tells nothing.
_DUMMY_SALT, _DUMMY_HASH = b"\0" * 16, b"\0" * 32


@dataclass(frozen=True)
class Operator:
    username: str
    role: Role
    created_at: datetime
    disabled_at: datetime | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {
            "username": self.username,
            "role": self.role,
            "created_at": self.created_at.isoformat(),
            "disabled_at": None if self.disabled_at is None else self.disabled_at.isoformat(),
        }


def role_allows(role: str, needed: Role) -> bool:
    """True when ``role`` is ``needed`` or above it."""
    ranks = {name: rank for rank, name in enumerate(ROLES)}
    return role in ranks and ranks[role] >= ranks[needed]


def check_role(role: object) -> Role:
    for known in ROLES:
        if role == known:
            return known
    raise InvalidValueError(f"role {role!r} is not one of {', '.join(ROLES)}", field="role")


def _operator(row: asyncpg.Record) -> Operator:
    return Operator(row["username"], row["role"], row["created_at"], row["disabled_at"])


async def add_operator(pool: asyncpg.Pool, username: str, role: str, password: str) -> Operator:
    """Create an operator; ``operator_exists`` if the name is taken."""
    if not _USERNAME.match(username):
        raise InvalidValueError(
            f"username {username!r} must match {_USERNAME.pattern}", field="username"
        )
    checked = check_role(role)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise InvalidValueError(
            f"a password has at least {MIN_PASSWORD_LENGTH} characters", field="password"
        )
    salt, digest = hash_password(password)
    row = await pool.fetchrow(_INSERT, username, checked, salt, digest)
    if row is None:
        raise AdminError(f"operator {username!r} exists", field="username", code="operator_exists")
    return _operator(row)


async def list_operators(pool: asyncpg.Pool) -> list[Operator]:
    return [_operator(row) for row in await pool.fetch(_LIST)]


async def authenticate(pool: asyncpg.Pool, username: str, password: str) -> Operator:
    """The operator whose password this is, or ``login_failed`` (the same for an unknown
    name, a wrong password and a disabled operator)."""
    row = await pool.fetchrow(_CREDENTIALS, username)
    salt, digest = (
        (_DUMMY_SALT, _DUMMY_HASH)
        if row is None
        else (
            bytes(row["password_salt"]),
            bytes(row["password_hash"]),
        )
    )
    ok = verify_password(password, salt, digest)
    if row is None or not ok or row["disabled_at"] is not None:
        raise AdminError(
            "unknown username or wrong password", field="password", code="login_failed"
        )
    return _operator(row)
