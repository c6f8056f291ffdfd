"""The structured store's change events, as the semantic and analytics workers read them.

The libSQL worker owns these topics' contracts. Readers here are lenient on purpose:
unknown fields are ignored, optional ones may be missing, and a payload may arrive as
a plain map or as the owner's Struct.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, TypeVar

import msgspec

from contracts.errors import ValidationError

T = TypeVar("T")
REMOVING_OPS = frozenset({"delete", "deleted", "remove", "removed"})


class FactChanged(msgspec.Struct, kw_only=True):
    fact_id: str
    user_id: str | None = None
    text: str = ""
    fact_type: str | None = None
    category: str | None = None
    confidence: float | None = None
    created_at: Any = None
    updated_at: Any = None
    version: int | None = None
    superseded_by: str | None = None
    metadata: dict[str, Any] | None = None
    deleted: bool = False
    is_active: bool | None = None
    op: str | None = None

    @property
    def removed(self) -> bool:
        """Superseded, deleted or deactivated: no longer a current fact."""
        return bool(self.superseded_by or self.deleted or self.is_active is False
                    or (self.op or "").lower() in REMOVING_OPS)


class MessageChanged(msgspec.Struct, kw_only=True):
    message_id: str
    conversation_id: str | None = None
    user_id: str | None = None
    role: str | None = None
    text: str = ""
    created_at: Any = None
    sentiment: float | None = None
    deleted: bool = False
    op: str | None = None

    @property
    def removed(self) -> bool:
        return self.deleted or (self.op or "").lower() in REMOVING_OPS


class FeedbackChanged(msgspec.Struct, kw_only=True):
    feedback_id: str
    user_id: str | None = None
    conversation_id: str | None = None
    message_id: str | None = None
    kind: str | None = None
    value: Any = None
    rating: Any = None
    created_at: Any = None
    deleted: bool = False
    op: str | None = None

    @property
    def removed(self) -> bool:
        return self.deleted or (self.op or "").lower() in REMOVING_OPS

    @property
    def score(self) -> float | None:
        """The numeric value of the feedback (rating first), if it has one."""
        for value in (self.rating, self.value):
            if isinstance(value, bool):
                return 1.0 if value else 0.0
            if isinstance(value, int | float):
                return float(value)
        return None


_FEEDBACK_NAMES = {"event_id": "feedback_id", "event_type": "kind", "reward": "rating", "timestamp": "created_at"}
"""The libSQL worker's feedback event uses the seed's field names; these are the analytics names for them."""


def read_event(payload: Any, kind: type[T], topic: str) -> T:
    """``payload`` as ``kind``; a payload missing required fields is a ValidationError naming the topic."""
    if kind is FeedbackChanged:
        data = msgspec.to_builtins(payload)
        if isinstance(data, dict):
            payload = {_FEEDBACK_NAMES.get(k, k) if _FEEDBACK_NAMES.get(k, k) not in data else k: v
                       for k, v in data.items()}
    try:
        if isinstance(payload, msgspec.Struct):
            return msgspec.convert(payload, kind, strict=False, from_attributes=True)
        return msgspec.convert(payload, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"invalid payload for topic {topic!r}: {exc}", topic=topic,
                              expected=kind.__name__) from None


def timestamp(value: Any) -> float | None:
    """Unix seconds from a number (seconds) or an ISO-8601 string or datetime; None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(value, str):
        try:
            parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)).timestamp()
    return None
