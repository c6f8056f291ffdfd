"""Structured logging set-up: one event name per line of meaning, with topic, seq, correlation id, worker."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from contextvars import ContextVar
from typing import Any

import structlog

from contracts.envelope import Envelope

_handling: ContextVar[tuple[Envelope, str] | None] = ContextVar("membus_handling", default=None)


class handling:  # lower case, like contextlib.suppress: it reads as `with handling(envelope, worker):`
    """Lines logged inside carry the message's topic, seq and correlation id, and the worker. One context
    variable set per message; the fields are only built for a line that is actually written."""

    __slots__ = ("_token", "_value")

    def __init__(self, envelope: Envelope, worker: str) -> None:
        self._value = (envelope, worker)

    def __enter__(self) -> None:
        self._token = _handling.set(self._value)

    def __exit__(self, *exc: object) -> None:
        _handling.reset(self._token)


def add_message_fields(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the fields of the message being handled (see :func:`handling`)."""
    current = _handling.get()
    if current is not None:
        envelope, worker = current
        event.setdefault("topic", envelope.topic)
        event.setdefault("seq", envelope.seq)
        event.setdefault("correlation_id", envelope.correlation_id)
        event.setdefault("worker", worker)
    return event


class _Stderr:
    """``sys.stderr`` as it is when a line is written: a caller (click's test runner) may swap it after configure
    and close the one it swapped in, which a logger holding the stream itself would then write to."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def stderr_loggers() -> structlog.PrintLoggerFactory:
    """structlog's print loggers, writing to ``sys.stderr`` as it is at each line."""
    return structlog.PrintLoggerFactory(file=_Stderr())  # type: ignore[arg-type]


def configure(*, level: str | None = None, json: bool | None = None, process: str = "") -> None:
    """Logs go to stderr; JSON lines when not on a terminal (or MEMBUS_LOG_JSON=1)."""
    level_name = (level or os.environ.get("MEMBUS_LOG_LEVEL", "info")).upper()
    as_json = json if json is not None else (os.environ.get("MEMBUS_LOG_JSON") == "1" or not sys.stderr.isatty())
    processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_message_fields,
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
        logger_factory=stderr_loggers(),
        cache_logger_on_first_use=True,
    )
