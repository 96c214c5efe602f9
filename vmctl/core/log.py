"""Structured logging through structlog.

The library only asks for loggers (bound per sandbox with its id and QEMU pid); it never
configures structlog. Applications and the ``vmctl`` command call :func:`configure`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import structlog

LEVEL_ENV = "VMCTL_LOG_LEVEL"


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written, not when a logger was made: test
    runners and daemons swap it, and a logger must not keep writing to a closed one."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


STDERR: Any = _Stderr()


def get_logger(name: str, **bound: Any) -> Any:
    """The application's structlog setup if it has one; else warnings and errors on stderr.

    (Unconfigured structlog would print every debug line to stdout; a library should not.)
    """
    if structlog.is_configured():
        return structlog.get_logger(name).bind(**bound)
    level = logging.getLevelName(os.environ.get(LEVEL_ENV, "warning").upper())
    return structlog.wrap_logger(
        structlog.PrintLogger(STDERR),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level if isinstance(level, int) else logging.WARNING),
    ).bind(logger=name, **bound)


def configure(*, json: bool = False, level: str = "warning") -> None:
    """Console (human) or JSON lines on stderr, at ``level``; used by the CLI."""
    numeric = logging.getLevelName(level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(STDERR),
        cache_logger_on_first_use=False,
    )
