"""Register ids unique to this test session.

RabbitMQ's users are global, not per vhost: every register a test provisions gets a
broker user ``reg-<register_id>`` (``tillsync_protocol.topology.register_username``) that
the test's own vhost does not isolate. With fixed ids (``r-1``, ``r-hole``…) two test
sessions on one broker would take over, or delete, each other's registers' users; so a
test that creates a broker user for a register names the register with :func:`reg`.
"""

from __future__ import annotations

import secrets

__all__ = ["RUN", "reg"]

RUN = secrets.token_hex(3)
"""This session's suffix: 6 hex digits, so ``reg(name)`` is ``name`` plus 7 characters
(register ids are ``^[a-z0-9][a-z0-9-]{0,62}$``: base names up to 56 characters fit)."""


def reg(name: str) -> str:
    """A register id of this run: broker users are not per vhost, and two test sessions
    on one broker must not take over each other's registers."""
    return f"{name}-{RUN}"
