"""What the client library hands to application code: an envelope plus its decoded payload."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts.envelope import Envelope, envelope_dict
from contracts.registry import decode_payload, to_builtins


class Message:
    """A logged message. ``payload`` is decoded (and validated) on first access."""

    __slots__ = ("_payload", "envelope")

    _UNSET: Any = object()

    def __init__(self, envelope: Envelope) -> None:
        self.envelope = envelope
        self._payload: Any = Message._UNSET

    @property
    def payload(self) -> Any:
        if self._payload is Message._UNSET:
            self._payload = decode_payload(self.envelope.topic, self.envelope.payload)
        return self._payload

    seq = property(lambda self: self.envelope.seq)
    topic = property(lambda self: self.envelope.topic)
    id = property(lambda self: self.envelope.id)
    ts = property(lambda self: self.envelope.ts)
    source = property(lambda self: self.envelope.source)
    correlation_id = property(lambda self: self.envelope.correlation_id)
    causation_id = property(lambda self: self.envelope.causation_id)
    headers = property(lambda self: self.envelope.headers)

    def to_dict(self) -> dict[str, Any]:
        out = envelope_dict(self.envelope)
        try:
            out["payload"] = to_builtins(self.payload)
        except Exception as exc:  # show what is there even when it does not match its contract
            out["payload_error"] = str(exc)
            try:
                out["payload"] = to_builtins(msgspec.msgpack.decode(self.envelope.payload))
            except (msgspec.DecodeError, TypeError, ValueError):  # not even MessagePack: the bytes, as base64
                out["payload"] = to_builtins(bytes(self.envelope.payload))
        return out

    def __repr__(self) -> str:
        return f"Message(seq={self.seq}, topic={self.topic!r}, id={self.id!r})"


class Delivery:
    """A message handed to a consumer-group member; ack it (or nack it) when done.

    A plain slotted class, not a frozen dataclass: one is made per delivered message, and a frozen
    dataclass's ``__init__`` costs several times as much.
    """

    __slots__ = ("attempt", "message", "seq")

    def __init__(self, message: Message, attempt: int) -> None:
        self.message = message
        self.attempt = attempt
        self.seq: int = message.envelope.seq

    def __repr__(self) -> str:
        return f"Delivery(seq={self.seq}, attempt={self.attempt}, topic={self.message.topic!r})"
