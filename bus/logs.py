"""Structured logging set-up: one event name per line of meaning, with topic, seq, correlation id, worker."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure(*, level: str | None = None, json: bool | None = None, process: str = "") -> None:
    """Logs go to stderr; JSON lines when not on a terminal (or MEMBUS_LOG_JSON=1)."""
    level_name = (level or os.environ.get("MEMBUS_LOG_LEVEL", "info")).upper()
    as_json = json if json is not None else (os.environ.get("MEMBUS_LOG_JSON") == "1" or not sys.stderr.isatty())
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if process:
        structlog.contextvars.bind_contextvars(process=process)
    if as_json:
        processors += [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
