"""Contracts of working memory: recent messages per conversation and session context, kept in LMDB.

Requests reject unknown fields so a misspelt field is answered with a ValidationError, not ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from contracts.inventory import InventoryPage, InventoryQuery
from contracts.registry import register

WORKER = "lmdb"

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$(?!\n)")]
"""As the structured store's ids (contracts.structured.Id): a conversation libSQL holds can be asked for here."""
Seconds = Annotated[float, msgspec.Meta(gt=0, le=3_155_760_000)]
"""Up to a century (no infinity: expiry times are whole milliseconds)."""
UnixTime = Annotated[float, msgspec.Meta(ge=0, le=32_503_680_000)]
"""Up to the year 3000."""


class WorkingMessage(msgspec.Struct, frozen=True):
    """One message held in working memory."""

    message_id: str
    user_id: str
    role: str
    text: str
    ts: float
    """When the message was written, unix seconds."""


class AppendMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Adds a message to a conversation's working memory (idempotent on message_id)."""

    conversation_id: Id
    user_id: Id
    role: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    text: str
    message_id: Id | None = None
    """Defaults to the request's envelope id, so a redelivered request is still stored once."""
    ts: UnixTime | None = None
    """Defaults to the request's creation time."""
    ttl: Seconds | None = None
    """Defaults to the worker's ``ttl_seconds`` (24 h)."""


class AppendReply(msgspec.Struct, frozen=True):
    conversation_id: str
    message_id: str
    count: int
    """Messages the conversation now holds."""
    stored: bool
    """False when the message was already held, or had already expired."""


class RecentRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The most recent messages of a conversation, oldest first, expired ones left out."""

    conversation_id: Id
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20


class RecentReply(msgspec.Struct, frozen=True):
    conversation_id: str
    messages: list[WorkingMessage]


class ConversationClear(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Drops a conversation's working memory."""

    conversation_id: Id


class ClearedConversation(msgspec.Struct, frozen=True):
    """That a conversation's working memory was cleared, kept for the TTL (what it held is not expected back)."""

    conversation_id: str
    at: float


class ConversationClearReply(msgspec.Struct, frozen=True):
    conversation_id: str
    removed: int


class ContextSet(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Sets one key of a session's context to any MessagePack value."""

    session_id: Id
    key: Id
    value: Any
    ttl: Seconds | None = None
    """Defaults to the worker's ``ttl_seconds``."""


class ContextSetReply(msgspec.Struct, frozen=True):
    session_id: str
    key: str
    expires_at: float


class ContextGet(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A session's context: every key that has not expired."""

    session_id: Id


class ContextGetReply(msgspec.Struct, frozen=True):
    session_id: str
    values: dict[str, Any]


class ContextClear(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Removes one key of a session's context, or all of them when ``key`` is left out."""

    session_id: Id
    key: Id | None = None


class ContextClearReply(msgspec.Struct, frozen=True):
    session_id: str
    removed: int


class ContextChanged(msgspec.Struct, frozen=True):
    """A session's context changed: keys were set or cleared."""

    session_id: str
    action: Literal["set", "clear"]
    keys: list[str]


APPEND = "working.message.append.request"
RECENT = "working.recent.request"
CONVERSATION_CLEAR = "working.conversation.clear.request"
CONTEXT_SET = "working.context.set.request"
CONTEXT_GET = "working.context.get.request"
CONTEXT_CLEAR = "working.context.clear.request"
CONTEXT_CHANGED = "working.context.changed"

register(APPEND, AppendMessage, reply=AppendReply, handled_by=WORKER)
register(RECENT, RecentRequest, reply=RecentReply, handled_by=WORKER)
register(CONVERSATION_CLEAR, ConversationClear, reply=ConversationClearReply, handled_by=WORKER)
register(CONTEXT_SET, ContextSet, reply=ContextSetReply, handled_by=WORKER)
register(CONTEXT_GET, ContextGet, reply=ContextGetReply, handled_by=WORKER)
register(CONTEXT_CLEAR, ContextClear, reply=ContextClearReply, handled_by=WORKER)
register(CONTEXT_CHANGED, ContextChanged, published_by=WORKER,
         description="Published by the lmdb worker when a session's context changes.")


class WorkingInventory(InventoryQuery, kw_only=True, forbid_unknown_fields=True):
    """One page of the messages working memory holds, unexpired (`membus check`); info gives its limits.
    ``cleared``: the conversations cleared within the TTL (id: the conversation, ts: when it was cleared)."""

    kind: Literal["messages", "cleared"] = "messages"


INVENTORY = "working.inventory.request"
register(INVENTORY, WorkingInventory, reply=InventoryPage, handled_by=WORKER)
