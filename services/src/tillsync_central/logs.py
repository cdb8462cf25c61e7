"""Logging of a central process: structlog events, as JSON lines or as console key=value.

Called once, by the CLI, before anything logs. Records from libraries that use the
standard ``logging`` module (asyncpg, aio-pika) go through the same renderer, and any
``scheme://user:password@`` in a logged string is masked on the way out.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from .settings import LogFormat, LogLevel, redact_url

__all__ = ["configure_logging"]


def _redact_secrets(_logger: WrappedLogger, _method: str, event: EventDict) -> EventDict:
    for key, value in event.items():
        if isinstance(value, str) and "@" in value:
            event[key] = redact_url(value)
    return event


def configure_logging(
    format: LogFormat = "console",
    level: LogLevel | str = "info",
    *,
    stream: TextIO | None = None,
) -> None:
    """Route structlog and standard logging to ``stream`` (stderr by default).

    ``format="json"`` writes one JSON object per line (for log shippers);
    ``"console"`` writes a timestamp, the level, the event and ``key=value`` pairs.
    """
    output = sys.stderr if stream is None else stream
    numeric_level = logging.getLevelNamesMapping()[level.upper()]

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        _redact_secrets,
    ]
    renderer: Processor
    if format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=_is_tty(output))

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        cache_logger_on_first_use=True,
    )

    handler = logging.StreamHandler(output)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)


def _is_tty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
