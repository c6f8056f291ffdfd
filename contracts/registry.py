"""The catalog of topics: each topic's payload contract, its reply contract and who handles it.

Contracts are ``msgspec.Struct`` types, so a payload is validated while it is decoded,
in one pass. A topic with no registered contract carries any MessagePack value.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from contracts.errors import UnknownTopic, ValidationError
from contracts.topics import check_topic, reply_topics

T = TypeVar("T")


@dataclass(frozen=True)
class TopicSpec:
    topic: str
    payload: type[Any]
    reply: type[Any] | None = None
    handled_by: str = ""
    description: str = ""
    published_by: str = ""
    """The worker whose store the topic tells of (its change events): with a permissions file, only workers may
    publish it (bus/permissions.py)."""


_TOPICS: dict[str, TopicSpec] = {}
_DECODERS: dict[str, msgspec.msgpack.Decoder[Any]] = {}
_any_decoder = msgspec.msgpack.Decoder()
_encoder = msgspec.msgpack.Encoder()


def register(
    topic: str, payload: type[Any], *, reply: type[Any] | None = None, handled_by: str = "", description: str = "",
    published_by: str = "",
) -> TopicSpec:
    """Registers a topic's contract; a ``.request`` topic with ``reply`` also registers its ``.complete``."""
    check_topic(topic)
    spec = TopicSpec(topic, payload, reply, handled_by, description or (payload.__doc__ or "").strip(),
                     published_by)
    _TOPICS[topic] = spec
    _DECODERS[topic] = msgspec.msgpack.Decoder(payload)
    if reply is not None:
        complete, _ = reply_topics(topic)
        _TOPICS[complete] = TopicSpec(complete, reply, None, handled_by, f"Reply to {topic}")
        _DECODERS[complete] = msgspec.msgpack.Decoder(reply)
    return spec


def spec_for(topic: str) -> TopicSpec | None:
    return _TOPICS.get(topic)


def all_specs() -> list[TopicSpec]:
    return [_TOPICS[t] for t in sorted(_TOPICS)]


_FIELD_RE = re.compile(r"at (`key` in )?`\$((?:\.[^`\[]+|\[(?:\d+|\.\.\.)\])*)`")
"""msgspec's path of the bad value: ``$.a.b[0]``, ``$.a[...]`` (a map's value), or ``key` in `$.a`` (a map's key)."""
_NAMED_RE = re.compile(r"(?:missing required field|unknown field|Object field) `([^`]+)`")


def _validation_error(topic: str, exc: Exception) -> ValidationError:
    text = str(exc)
    m = _FIELD_RE.search(text)
    field = m.group(2).lstrip(".") if m else ""
    named = _NAMED_RE.search(text)
    if named:  # "Object missing required field `x` - at `$.a`" names x inside a
        field = f"{field}.{named.group(1)}" if field else named.group(1)
    expected = text.split(" - at ")[0]
    where = f" field {field!r}" + (" (a key)" if m and m.group(1) else "") if field else ""
    return ValidationError(f"invalid payload for topic {topic!r}{where}: {expected}", topic=topic, field=field,
                           expected=expected)


def encode_payload(topic: str, payload: Any) -> bytes:
    """Encodes a payload for ``topic``; a dict is checked against the contract first."""
    spec = _TOPICS.get(topic)
    if spec is not None and not isinstance(payload, spec.payload):
        try:
            payload = msgspec.convert(payload, spec.payload)
        except msgspec.ValidationError as exc:
            raise _validation_error(topic, exc) from None
    try:
        return _encoder.encode(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValidationError(f"payload for topic {topic!r} is not encodable: {exc}", topic=topic,
                              field="", expected="MessagePack-encodable value") from None


def decode_payload(topic: str, data: bytes | memoryview, *, strict: bool = False) -> Any:
    """Decodes and validates a payload; raises ValidationError naming the topic and field."""
    decoder = _DECODERS.get(topic)
    if decoder is None:
        if strict:
            raise UnknownTopic(f"no contract is registered for topic {topic!r}", topic=topic, field="topic",
                               expected="a registered topic (see `membus topics`)")
        decoder = _any_decoder
    try:
        return decoder.decode(data)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise _validation_error(topic, exc) from None


def to_builtins(value: Any) -> Any:
    """A payload as plain JSON-friendly Python values."""
    return msgspec.to_builtins(value)


def json_schema(topic: str) -> dict[str, Any]:
    spec = _TOPICS.get(topic)
    if spec is None:
        return {}
    return msgspec.json.schema(spec.payload)
