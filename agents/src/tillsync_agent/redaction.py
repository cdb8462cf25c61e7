"""Keeping secrets out of logs and status: credentials in URLs are masked wherever text
leaves the agent (log lines, ``status``, the local API).

The agent's secrets are the broker password (inside ``amqp_url``) and the local API's
token; both are ``SecretStr`` in the settings and never formatted into text on purpose.
This is the safety net for the rest: an error message from a library that quotes the URL.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Any

__all__ = ["redact", "redact_processor"]

_URL_CREDENTIALS = re.compile(
    r"(?P<prefix>[a-zA-Z][a-zA-Z0-9+.-]*://[^:@/\s]*):(?P<password>[^@/\s]+)@"
)


def redact(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@`` replaced by ``***``."""
    return _URL_CREDENTIALS.sub(r"\g<prefix>:***@", text)


def redact_processor(
    logger: object, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor applying :func:`redact` to every string value."""
    for key, value in event.items():
        if isinstance(value, str) and "://" in value:
            event[key] = redact(value)
    return event
