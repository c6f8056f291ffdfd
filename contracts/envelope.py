"""The envelope every message travels in, on the wire and in the log.

Encoded as a MessagePack array (``array_like``) so the broker reads the header
fields it routes on without touching the payload: ``payload`` stays
``msgspec.Raw``, the payload's own MessagePack bytes, until a consumer decodes
it against the topic's contract (contracts/registry.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec

from contracts.errors import ValidationError
from contracts.ids import new_id, new_ids

CONTRACT_VERSION = 1
ID_MAX = 100
"""Characters of an id, a correlation or causation id and an inbox name. The log indexes ids and correlation ids
as LMDB keys, which stop at 511 bytes: 100 characters are at most 400 bytes of UTF-8."""
HEADERS_MAX = 32
HEADER_MAX = 4096
"""Entries in ``headers``, and characters of a header's name or value (W3C ``tracestate`` is at most 512)."""

Id = Annotated[str, msgspec.Meta(max_length=ID_MAX)]
Header = Annotated[str, msgspec.Meta(max_length=HEADER_MAX)]


class Envelope(msgspec.Struct, array_like=True, omit_defaults=False, gc=False):
    """``gc=False``: an envelope holds only strings, ints, bytes and a str -> str map, so it can never be
    part of a reference cycle; untracked, the thousands decoded per broker turn do not trigger collections."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=ID_MAX)]
    topic: Annotated[str, msgspec.Meta(max_length=255)]
    payload: msgspec.Raw
    seq: int = 0
    """Assigned by the broker when the message is durably in the log; 0 before."""
    ts: int = 0
    """Creation time, unix nanoseconds, set by the publisher."""
    source: str = ""
    """The module identity, set by the broker from the authenticated CurveZMQ key."""
    correlation_id: Id = ""
    causation_id: Id = ""
    reply_to: Id = ""
    """On a request: the inbox the requester listens on."""
    recipient: Id = ""
    """On a reply: the inbox it is addressed to (the request's ``reply_to``)."""
    version: int = CONTRACT_VERSION
    headers: Annotated[dict[Header, Header], msgspec.Meta(max_length=HEADERS_MAX)] = {}
    """Small string map; carries W3C trace context (``traceparent``, ``tracestate``)."""


DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)
"""What decoding untrusted bytes can raise (msgspec reports bad UTF-8 as UnicodeDecodeError)."""

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)
_batch_decoder = msgspec.msgpack.Decoder(list[Envelope])


def check_header_fields(message_id: str | None, correlation_id: str, causation_id: str,
                        headers: dict[str, str] | None) -> None:
    """What the broker would refuse the whole PUB frame for, refused before sending (the frame may carry other
    publishes too)."""
    for name, value in (("message_id", message_id), ("correlation_id", correlation_id),
                        ("causation_id", causation_id)):
        if value is not None and not isinstance(value, str):
            raise ValidationError(f"{name} is a {type(value).__name__}, not text", field=name, expected="str")
        if value is not None and len(value) > ID_MAX:
            raise ValidationError(f"{name} is {len(value)} characters, more than {ID_MAX}", field=name,
                                  expected=f"at most {ID_MAX} characters")
    if headers and not all(isinstance(s, str) for kv in headers.items() for s in kv):
        raise ValidationError("headers: every key and value is text", field="headers", expected="dict[str, str]")
    if headers and (len(headers) > HEADERS_MAX or max(len(s) for kv in headers.items() for s in kv) > HEADER_MAX):
        raise ValidationError(f"headers: at most {HEADERS_MAX} entries of at most {HEADER_MAX} characters each",
                              field="headers", expected=f"at most {HEADERS_MAX} short entries")


def make_envelope(
    topic: str,
    payload_bytes: bytes,
    *,
    correlation_id: str = "",
    causation_id: str = "",
    reply_to: str = "",
    recipient: str = "",
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
) -> Envelope:
    mid = message_id or new_id()
    return Envelope(
        id=mid,
        topic=topic,
        payload=msgspec.Raw(payload_bytes),
        ts=time.time_ns(),
        correlation_id=correlation_id or mid,
        causation_id=causation_id,
        reply_to=reply_to,
        recipient=recipient,
        headers=headers or {},
    )


_NO_HEADERS: dict[str, str] = {}


def encode_new(
    topic: str,
    payload_bytes: bytes,
    *,
    correlation_id: str = "",
    causation_id: str = "",
    reply_to: str = "",
    recipient: str = "",
    headers: dict[str, str] | None = None,
    message_id: str | None = None,
) -> tuple[str, bytes]:
    """(id, wire bytes) of ``make_envelope(...)`` without building the Struct: the publish hot path."""
    mid = message_id or new_id()
    return mid, _encoder.encode((mid, topic, msgspec.Raw(payload_bytes), 0, time.time_ns(), "",
                                 correlation_id or mid, causation_id, reply_to, recipient, CONTRACT_VERSION,
                                 headers or _NO_HEADERS))


def encode_many(topic: str, payloads: Sequence[bytes], message_ids: Sequence[str] | None = None) -> bytes:
    """The wire bytes of one new envelope per payload on ``topic``, concatenated as in a PUB frame's array
    but without its header: what ``encode_new`` makes for each, in one encoder call."""
    ids = message_ids if message_ids is not None else new_ids(len(payloads))
    ts = time.time_ns()
    data = _encoder.encode([(mid, topic, msgspec.Raw(p), 0, ts, "", mid, "", "", "", CONTRACT_VERSION, _NO_HEADERS)
                            for mid, p in zip(ids, payloads, strict=True)])
    return data[len(array_header(len(ids))):]


def array_header(n: int) -> bytes:
    """The MessagePack header of an array of ``n`` items: a PUB frame is one before its envelopes."""
    if n < 16:
        return bytes([0x90 | n])
    if n < 65536:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_envelope(env: Envelope) -> bytes:
    return _encoder.encode(env)


def encode_batch(envs: list[Envelope]) -> bytes:
    return _encoder.encode(envs)


def decode_envelope(data: bytes | memoryview) -> Envelope:
    """Raises msgspec.DecodeError / ValidationError; callers translate (see contracts.registry)."""
    return _decoder.decode(data)


def decode_batch(data: bytes | memoryview) -> list[Envelope]:
    return _batch_decoder.decode(data)


def envelope_dict(env: Envelope) -> dict[str, Any]:
    """The envelope's fields without the payload, for logs, JSON output and replay."""
    return {f: getattr(env, f) for f in env.__struct_fields__ if f != "payload"}
