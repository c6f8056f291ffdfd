"""The one error hierarchy of membus, shared by the broker, the client, the workers and the stores.

Every error carries a stable ``code`` (sent on the wire) and structured fields, so a
``.failed`` reply can be turned back into the same typed exception on the caller's side.
"""

from __future__ import annotations

import builtins
from typing import Any, ClassVar


class BusError(Exception):
    """Root of every membus error."""

    code: ClassVar[str] = "bus_error"

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields: dict[str, Any] = fields

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "fields": self.fields}

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.code, self.message, self.fields))


class TimeoutError(BusError, builtins.TimeoutError):
    """No answer in time; ``except TimeoutError`` (the builtin) catches it too."""

    code = "timeout"


class ConnectionError(BusError, builtins.ConnectionError):
    """The broker cannot be reached, or the connection was closed."""

    code = "connection"


class NotAuthorized(BusError):
    """The broker refused this client's key, or the module may not use the topic."""

    code = "not_authorized"


class ProtocolError(BusError):
    """A frame that does not follow bus/protocol.py."""

    code = "protocol"


class MessageTooLarge(ProtocolError):
    code = "too_large"


class ValidationError(BusError):
    """A payload or envelope that does not match its contract; names the topic and the field."""

    code = "validation"

    def __init__(self, message: str, *, topic: str = "", field: str = "", expected: str = "", **fields: Any):
        super().__init__(message, topic=topic, field=field, expected=expected, **fields)
        self.topic = topic
        self.field = field
        self.expected = expected


class UnknownTopic(ValidationError):
    code = "unknown_topic"


class StoreError(BusError):
    """A store failed to apply a message (translated from the driver in one place per store)."""

    code = "store"


class IntegrityError(StoreError):
    """Data at rest failed its authentication check, or a constraint was violated."""

    code = "integrity"


class NotFound(StoreError):
    code = "not_found"


class StoreFull(StoreError):
    code = "store_full"


class StoreUnavailable(StoreError):
    """The store cannot be written just now (a full disk, an I/O error, a lock held elsewhere): nothing was
    written. The broker refuses the publish, a worker retries its whole batch until it can; neither answers a
    message ``.failed`` for it."""

    code = "store_unavailable"


class StoreRejected(StoreError):
    """The store refused what one message asked it to write (a value or a key it cannot hold), and said so only
    when the batch was written. A worker applies the batch in halves until the message is alone, then answers
    it ``.failed`` with this error and dead-letters it; the other messages of the batch are applied."""

    code = "store_rejected"


class HandlerError(BusError):
    """A handler raised something that is not a BusError; the original type and text are kept."""

    code = "handler"


_BY_CODE: dict[str, type[BusError]] = {}


def _register(cls: type[BusError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


def error_from_wire(data: dict[str, Any]) -> BusError:
    """Rebuilds the typed error a ``.failed`` reply or an ERROR frame carries."""
    return _rebuild(str(data.get("code", "")), str(data.get("message", "")), dict(data.get("fields") or {}))


def _rebuild(code: str, message: str, fields: dict[str, Any]) -> BusError:
    if code not in _BY_CODE:  # subclasses defined since the last call (e.g. schemas.registry's) join the table
        _register(BusError)
    cls = _BY_CODE.get(code, BusError)
    err = cls.__new__(cls)
    BusError.__init__(err, message, **fields)
    if isinstance(err, ValidationError):
        err.topic = str(fields.get("topic", ""))
        err.field = str(fields.get("field", ""))
        err.expected = str(fields.get("expected", ""))
    return err
