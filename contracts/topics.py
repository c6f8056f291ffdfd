"""Topic names and patterns.

A topic is ``<domain>.<entity>.<verb>`` (three or more dot-separated segments of
``[a-z0-9_-]``). A pattern may use ``*`` for exactly one segment and ``>`` as the
last segment for one or more remaining segments, as in NATS. Patterns are matched
here, never by ZeroMQ's prefix filter.
"""

from __future__ import annotations

import re
from functools import lru_cache

from contracts.errors import ValidationError

_SEGMENT = re.compile(r"^[a-z0-9_-]+$")
REQUEST, COMPLETE, FAILED, CHANGED = "request", "complete", "failed", "changed"


@lru_cache(maxsize=4096)
def check_topic(topic: str) -> str:
    parts = topic.split(".")
    if len(parts) < 2 or not all(_SEGMENT.match(p) for p in parts):
        raise ValidationError(
            f"invalid topic {topic!r}: expected dot-separated segments of [a-z0-9_-]",
            topic=topic,
            field="topic",
            expected="<domain>.<entity>.<verb>",
        )
    return topic


def check_pattern(pattern: str) -> str:
    parts = pattern.split(".")
    for i, part in enumerate(parts):
        if part == ">" and i == len(parts) - 1:
            continue
        if part == "*" or _SEGMENT.match(part):
            continue
        raise ValidationError(
            f"invalid topic pattern {pattern!r}", topic=pattern, field="pattern", expected="segments, * or final >"
        )
    return pattern


@lru_cache(maxsize=65536)
def matches(pattern: str, topic: str) -> bool:
    p = pattern.split(".")
    t = topic.split(".")
    for i, seg in enumerate(p):
        if seg == ">":
            return len(t) > i
        if i >= len(t) or (seg != "*" and seg != t[i]):
            return False
    return len(p) == len(t)


def matches_any(patterns: tuple[str, ...] | list[str], topic: str) -> bool:
    return any(matches(p, topic) for p in patterns)


def reply_topics(request_topic: str) -> tuple[str, str]:
    """``a.b.request`` -> (``a.b.complete``, ``a.b.failed``)."""
    base = request_topic.rsplit(".", 1)[0] if request_topic.endswith("." + REQUEST) else request_topic
    return f"{base}.{COMPLETE}", f"{base}.{FAILED}"
