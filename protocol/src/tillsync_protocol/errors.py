"""The one error hierarchy of tillsync.

Every error carries a stable ``code`` (the same string appears on the wire in ack
rejections, in dead letters, in HTTP error bodies and in logs), the ``field`` it concerns
as a path such as ``body.lines[3].unit_price`` (empty when it concerns the whole message)
and a human ``reason``. ``docs/errors.md`` lists every code.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConfigError",
    "ConflictError",
    "FloatNotAllowedError",
    "InvalidValueError",
    "MalformedError",
    "MissingFieldError",
    "OutOfRangeError",
    "ProtocolError",
    "RejectedError",
    "TillsyncError",
    "TooLargeError",
    "UnknownFieldError",
    "UnknownTypeError",
    "UnsupportedVersionError",
    "WrongTypeError",
    "protocol_error_for_code",
]


class TillsyncError(Exception):
    """Root of every tillsync error: a stable code, the field concerned and a reason."""

    code: ClassVar[str] = "error"

    def __init__(self, reason: str, *, field: str = "", code: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        if code is not None:
            self.code = code  # type: ignore[misc]

    def __str__(self) -> str:
        where = f" at {self.field}" if self.field else ""
        return f"{self.code}{where}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        """The error as it travels: in ack rejections, dead letters and HTTP bodies."""
        return {"code": self.code, "field": self.field, "reason": self.reason}


class ProtocolError(TillsyncError):
    """Bytes that are not a valid tillsync v1 message."""

    code = "protocol_error"


class MalformedError(ProtocolError):
    """Not MessagePack, trailing bytes, not a map at the top, or an unsupported MessagePack type."""

    code = "malformed"


class TooLargeError(ProtocolError):
    """The encoded message is larger than the limit (1 MiB by default)."""

    code = "too_large"


class UnsupportedVersionError(ProtocolError):
    """The ``v`` field names a protocol major version this reader does not speak."""

    code = "unsupported_version"


class UnknownTypeError(ProtocolError):
    """The ``type`` field names no message type this reader knows."""

    code = "unknown_type"


class MissingFieldError(ProtocolError):
    """A required field is absent."""

    code = "missing_field"


class UnknownFieldError(ProtocolError):
    """A field this version does not define (allowed only from a newer minor version)."""

    code = "unknown_field"


class WrongTypeError(ProtocolError):
    """A field holds a value of the wrong MessagePack type."""

    code = "wrong_type"


class FloatNotAllowedError(ProtocolError):
    """A float anywhere in a message: money and quantities are integers, rates decimal strings."""

    code = "float_not_allowed"


class OutOfRangeError(ProtocolError):
    """A number or a length outside its allowed range."""

    code = "out_of_range"


class InvalidValueError(ProtocolError):
    """A value of the right type that is not allowed (bad pattern, unknown enum member…)."""

    code = "invalid_value"


class RejectedError(TillsyncError):
    """Central refused a well-formed document (unknown register, identity mismatch…)."""

    code = "rejected"


class ConflictError(TillsyncError):
    """The same idempotency key arrived with different content, or an edit lost to a newer one."""

    code = "conflict"


class ConfigError(TillsyncError):
    """Settings that cannot work (missing register id, bad URL, unreadable file…)."""

    code = "config_error"


_PROTOCOL_ERRORS: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        MalformedError,
        TooLargeError,
        UnsupportedVersionError,
        UnknownTypeError,
        MissingFieldError,
        UnknownFieldError,
        WrongTypeError,
        FloatNotAllowedError,
        OutOfRangeError,
        InvalidValueError,
    )
}

PROTOCOL_ERROR_CODES: tuple[str, ...] = tuple(_PROTOCOL_ERRORS)


def protocol_error_for_code(code: str, reason: str, field: str = "") -> ProtocolError:
    """Build the ``ProtocolError`` subclass that carries ``code``."""
    return _PROTOCOL_ERRORS.get(code, ProtocolError)(reason, field=field)
