"""Contracts of the structured-data topics, handled by the libSQL worker.

Requests are strict (an unknown field is an error that names it). Times are
ISO-8601 text; a time the caller leaves empty is the request envelope's creation
time, so rebuilding the store from the log gives the same rows. An id the caller
leaves empty is the request envelope's id, so a redelivered request never makes a
second row.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import msgspec

from contracts.inventory import InventoryPage, InventoryQuery
from contracts.registry import register

WORKER = "libsql"

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=r"^[^\x00-\x1f]+$(?!\n)")]
"""No control character (``$(?!\n)``: Python's ``$`` alone lets one final newline through; ECMA's never does)."""
OptionalId = Annotated[str, msgspec.Meta(max_length=200, pattern=r"^[^\x00-\x1f]*$(?!\n)")]
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=100_000)]
Confidence = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Offset = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
"""Bounded: SQLite failed on an offset near 2**63 ("datatype mismatch"), after five retries of a read."""
UNIX_SECONDS_MAX = 32_503_680_000
"""3000-01-01T00:00:00Z: the latest time a stored record may carry."""
UnixSeconds = Annotated[float, msgspec.Meta(ge=0, le=UNIX_SECONDS_MAX)]
"""1970 up to the year 3000 (no NaN, no infinity: readers turn it into whole milliseconds)."""
Role = Literal["user", "assistant", "system", "tool"]
Metadata = dict[str, Any]


class Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    def __post_init__(self) -> None:
        """A NUL character reaches SQLite as the end of a C string: the text was stored cut short, and a
        message's or fact's sealed copy then failed every read of its conversation or user."""
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, str) and "\x00" in value:
                raise ValueError(f"Object field `{name}` holds a NUL character (U+0000), which the store cannot keep")
            if isinstance(value, dict | list) and value and (why := _not_json(value)):
                raise ValueError(f"Object field `{name}` holds {why}, which the store (JSON) cannot keep: it "
                                 "would read back changed")


def _not_json(value: Any) -> str:
    """What in ``value`` JSON cannot keep as it is (NaN read back as null, the key 1 as "1", bytes as base64)."""
    if isinstance(value, float):
        return "" if math.isfinite(value) else "NaN or an infinity"
    if isinstance(value, bytes | bytearray | memoryview):
        return "bytes"
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return "a key that is not a string"
        return next((why for v in value.values() if (why := _not_json(v))), "")
    if isinstance(value, list | tuple):
        return next((why for v in value if (why := _not_json(v))), "")
    return ""


class Reply(msgspec.Struct, kw_only=True):
    pass


# -- users ---------------------------------------------------------------------------------------------------


class UserCreate(Request):
    """Creates a user profile (idempotent: the same request again returns the stored user)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    user_id: OptionalId = ""
    nickname: str = ""
    user_type: str = "person"
    metadata: Metadata = {}


class UserGet(Request):
    """Reads a user profile."""

    user_id: Id


class User(Reply):
    user_id: str
    name: str
    nickname: str
    user_type: str
    metadata: Metadata
    created_at: str
    updated_at: str


# -- conversations and messages ------------------------------------------------------------------------------


class ConversationStart(Request):
    """Starts a conversation of a user."""

    user_id: Id
    conversation_id: OptionalId = ""
    title: str = ""
    metadata: Metadata = {}


class Conversation(Reply):
    conversation_id: str
    user_id: str
    title: str
    metadata: Metadata
    started_at: str


class MessageAppend(Request):
    """Appends a message to a conversation (started implicitly if it does not exist yet)."""

    conversation_id: Id
    user_id: Id
    role: Role
    text: Text
    message_id: OptionalId = ""
    timestamp: str = ""
    sentiment: Annotated[float, msgspec.Meta(ge=-1.0, le=1.0)] | None = None
    metadata: Metadata = {}


class Message(Reply):
    message_id: str
    conversation_id: str
    user_id: str
    role: str
    text: str
    timestamp: str
    sentiment: float | None = None
    metadata: Metadata = {}


class MessageChanged(Reply):
    """A message was stored (``op`` created): the stored message, flat, and ``created_at`` in unix seconds."""

    op: Literal["created"]
    message_id: str
    conversation_id: str
    user_id: str
    role: str
    text: str
    timestamp: str
    created_at: UnixSeconds
    """``timestamp`` as unix seconds, for readers that keep numeric times."""
    sentiment: float | None = None
    metadata: Metadata = {}


class ConversationHistory(Request):
    """The messages of a conversation in order (by timestamp, then arrival), one page at a time.

    Page with ``after`` / ``before`` (a message id of the previous page: the page holds the messages after the
    last one / before the first one), which stays right while messages are added, back-dated ones too; an
    ``offset`` shifts when they are. ``newest`` (implied by ``before``) takes the last ``limit`` messages.
    A page is always oldest first; ``has_more`` says whether there are more in the direction of paging.
    """

    conversation_id: Id
    limit: Limit = 50
    offset: Offset = 0
    after: OptionalId = ""
    before: OptionalId = ""
    newest: bool = False


class MessagePage(Reply):
    conversation_id: str
    messages: list[Message]
    total: int
    offset: int
    has_more: bool


# -- semantic facts ------------------------------------------------------------------------------------------


class FactStore(Request):
    """Stores a semantic fact about a user; with ``supersedes`` it is a new version of that fact."""

    user_id: Id
    text: Text
    fact_type: str = ""
    category: str = ""
    confidence: Confidence = 1.0
    metadata: Metadata = {}
    fact_id: OptionalId = ""
    supersedes: OptionalId = ""


class FactUpdate(Request):
    """Makes a new version of a current fact; fields left out keep the old version's value."""

    fact_id: Id
    text: Text | None = None
    fact_type: str | None = None
    category: str | None = None
    confidence: Confidence | None = None
    metadata: Metadata | None = None
    new_fact_id: OptionalId = ""


class FactsQuery(Request):
    """The facts of a user: current ones unless ``include_superseded``; ``touch`` records an access."""

    user_id: Id
    fact_type: str = ""
    category: str = ""
    min_confidence: Confidence = 0.0
    include_superseded: bool = False
    touch: bool = False
    limit: Limit = 100
    offset: Offset = 0


class Fact(Reply):
    fact_id: str
    user_id: str
    text: str
    fact_type: str
    category: str
    confidence: float
    metadata: Metadata
    created_at: str
    last_updated: str
    last_accessed: str
    access_count: int
    version: int
    superseded_by: str | None = None
    supersedes: str | None = None


class FactList(Reply):
    user_id: str
    facts: list[Fact]


class FactChanged(Fact, kw_only=True):
    """A fact was stored (``op`` created) or replaced by a newer version (``op`` superseded, with
    ``superseded_by`` set): the fact's fields, flat."""

    op: Literal["created", "superseded"]
    updated_at: str
    """The same as ``last_updated``, under the name the semantic and analytics readers use."""


# -- full-text search ----------------------------------------------------------------------------------------


class TextSearch(Request):
    """Full-text search (FTS5, ranked by bm25) over messages and current facts; words are ANDed unless any.

    ``conversation_id`` narrows it to that conversation's messages: facts belong to a user, not to a conversation,
    so they are left out then. Scores of messages and of facts come from two indexes (lower is better in each)."""

    query: Annotated[str, msgspec.Meta(min_length=1, max_length=1000)]
    user_id: OptionalId = ""
    conversation_id: OptionalId = ""
    sources: list[Literal["messages", "facts"]] = msgspec.field(default_factory=lambda: ["messages", "facts"])
    match: Literal["all", "any"] = "all"
    limit: Limit = 20


class SearchHit(Reply):
    source: Literal["messages", "facts"]
    id: str
    user_id: str
    text: str
    snippet: str
    score: float
    """bm25: lower is a better match."""
    conversation_id: str = ""
    timestamp: str = ""


class SearchResults(Reply):
    query: str
    hits: list[SearchHit]


# -- feedback, logs ------------------------------------------------------------------------------------------


class FeedbackRecord(Request):
    """Records a feedback event (a rating, an action or a signal of the user)."""

    user_id: Id
    event_type: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] = "rating"
    message_id: OptionalId = ""
    skill_id: OptionalId = ""
    reward: Literal[-1, 0, 1] = 0
    reason: str = ""
    free_text: Annotated[str, msgspec.Meta(max_length=300)] = ""
    classified_categories: dict[str, float] = {}
    metadata: Metadata = {}
    event_id: OptionalId = ""
    timestamp: str = ""


class FeedbackEvent(Reply):
    """A feedback event as stored: a rating, reward or correction a user gave a message or skill."""

    event_id: str
    user_id: str
    event_type: str
    message_id: str
    skill_id: str
    reward: int
    reason: str
    free_text: str
    classified_categories: dict[str, float]
    metadata: Metadata
    timestamp: str
    processed: bool


class LogWrite(Request):
    """Writes a log record."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
    message: Text
    module: str = ""
    user_id: str = ""
    session_id: str = ""
    trace_id: str = ""
    extra: Metadata = {}
    timestamp: str = ""


class LogWritten(Reply):
    log_id: str
    timestamp: str


# -- tasks, sessions, consolidation --------------------------------------------------------------------------

TaskStatus = Literal["pending", "running", "completed", "failed", "cancelled"]


class TaskCreate(Request):
    """Creates a task (scheduled or one-off)."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    task_id: OptionalId = ""
    user_id: str = ""
    task_type: str = ""
    schedule: str = ""
    config: Metadata = {}
    enabled: bool = True


class TaskUpdate(Request):
    """Changes a task's status, result, error, schedule or enabled flag; fields left out are kept."""

    task_id: Id
    status: TaskStatus | None = None
    result: Metadata | None = None
    error: str | None = None
    schedule: str | None = None
    enabled: bool | None = None


class Task(Reply):
    task_id: str
    user_id: str
    name: str
    task_type: str
    schedule: str
    config: Metadata
    status: str
    enabled: bool
    result: Metadata
    error: str
    created_at: str
    updated_at: str


class SessionStart(Request):
    """Starts a session (the record that coordinates a working-memory session)."""

    user_id: Id
    session_id: OptionalId = ""
    conversation_id: str = ""
    metadata: Metadata = {}


class SessionEnd(Request):
    """Ends a session (ending an ended session again changes nothing)."""

    session_id: Id
    summary: str = ""


class Session(Reply):
    session_id: str
    user_id: str
    conversation_id: str
    status: str
    started_at: str
    ended_at: str | None
    summary: str
    metadata: Metadata


class ConsolidationSave(Request):
    """Saves the state of a consolidation run (replaces the state stored under ``state_id``)."""

    state_id: Id
    state: Metadata


class ConsolidationGet(Request):
    """Reads a consolidation state."""

    state_id: Id


class ConsolidationState(Reply):
    state_id: str
    state: Metadata
    updated_at: str


def _request(topic: str, payload: type[Any], reply: type[Any]) -> None:
    register(topic, payload, reply=reply, handled_by=WORKER)


def _event(topic: str, payload: type[Any]) -> None:
    register(
        topic,
        payload,
        description=f"Change event published by the {WORKER} worker: {(payload.__doc__ or '').strip()}",
        published_by=WORKER,
    )


_request("user.create.request", UserCreate, User)
_request("user.get.request", UserGet, User)
_request("conversation.start.request", ConversationStart, Conversation)
_request("conversation.message.append.request", MessageAppend, Message)
_request("conversation.history.request", ConversationHistory, MessagePage)
_request("memory.store.request", FactStore, Fact)
_request("memory.fact.update.request", FactUpdate, Fact)
_request("memory.facts.request", FactsQuery, FactList)
_request("memory.search.text.request", TextSearch, SearchResults)
_request("feedback.record.request", FeedbackRecord, FeedbackEvent)
_request("log.write.request", LogWrite, LogWritten)
_request("task.create.request", TaskCreate, Task)
_request("task.update.request", TaskUpdate, Task)
_request("session.start.request", SessionStart, Session)
_request("session.end.request", SessionEnd, Session)
_request("consolidation.state.save.request", ConsolidationSave, ConsolidationState)
_request("consolidation.state.get.request", ConsolidationGet, ConsolidationState)
_event("conversation.message.changed", MessageChanged)
_event("memory.fact.changed", FactChanged)
_event("feedback.event.changed", FeedbackEvent)


class StructuredInventory(InventoryQuery, kw_only=True, forbid_unknown_fields=True):
    """One page of the ids the structured store holds (`membus check`): facts, messages or feedback."""

    kind: Literal["facts", "messages", "feedback"]


_request("structured.inventory.request", StructuredInventory, InventoryPage)
