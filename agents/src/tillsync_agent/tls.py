"""The TLS context of the agent's broker connection (``amqps://``).

The broker's certificate is always verified, its host name included: there is no
"insecure" switch. The CA file, and the client certificate a register logs in with
(``?auth=external``), come from :class:`~tillsync_agent.settings.AgentSettings`; a file
that is missing or unusable raises :class:`~tillsync_protocol.ConfigError` naming the
setting (code ``config_error``), which the link shows as its last error.
"""

from __future__ import annotations

import ssl

from tillsync_protocol import ConfigError

from .settings import AgentSettings

__all__ = ["ssl_context"]


def ssl_context(settings: AgentSettings) -> ssl.SSLContext | None:
    """The context for ``settings.amqp_url``: None for ``amqp://``, else a verifying one
    (TLS 1.2 or later) with the client certificate, if any, loaded."""
    if not settings.uses_tls:
        return None
    cafile = None if settings.tls_ca_file is None else str(settings.tls_ca_file)
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the CA file {settings.tls_ca_file}: {_reason(exc)}",
            field="tls_ca_file",
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.tls_cert_file is not None:
        try:
            context.load_cert_chain(str(settings.tls_cert_file), settings.tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the client certificate {settings.tls_cert_file} with key "
                f"{settings.tls_key_file}: {_reason(exc)}",
                field="tls_cert_file",
            ) from None
    return context


def _reason(exc: OSError | ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    return exc.strerror or str(exc)
