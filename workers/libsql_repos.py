"""Repositories of the libSQL store: one small set of functions per data domain.

They run SQL through a ``Txn`` (workers/libsql.py), inside the batch transaction the
runtime opened, and speak the contract Structs of contracts/structured.py. Inserts
never overwrite: ``insert`` returns False when the id already exists, and the handler
decides whether that is the same request again or a conflict.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from contracts.structured import Conversation, Fact, FeedbackEvent, Message, SearchHit, Session, Task, User

if TYPE_CHECKING:
    from workers.libsql import Txn

S = TypeVar("S", bound=msgspec.Struct)


def dump(value: Any) -> str:
    """JSON text of a metadata value (bytes become base64 strings rather than failing)."""
    return msgspec.json.encode(value).decode()


def load(text: str | None) -> Any:
    return msgspec.json.decode(text) if text else {}


@dataclass(frozen=True)
class Table:
    """How a contract Struct is stored: its table, and which column holds which field."""

    name: str
    struct: type[msgspec.Struct]
    columns: dict[str, str]
    """column -> Struct field; the first one is the primary key ``id``."""
    json: frozenset[str] = frozenset()
    booleans: frozenset[str] = frozenset()

    @property
    def select(self) -> str:
        return f"SELECT {', '.join(self.columns)} FROM {self.name}"

    def values(self, item: msgspec.Struct) -> tuple[Any, ...]:
        out = []
        for column, field in self.columns.items():
            value = getattr(item, field)
            out.append(
                dump(value) if column in self.json else int(value) if column in self.booleans else value
            )
        return tuple(out)

    def load(self, row: Sequence[Any]) -> Any:
        fields = {}
        for (column, field), value in zip(self.columns.items(), row, strict=True):
            fields[field] = (
                load(value) if column in self.json else bool(value) if column in self.booleans else value
            )
        return self.struct(**fields)


def _table(name: str, struct: type[msgspec.Struct], columns: str, fields: str, **kinds: str) -> Table:
    mapping = dict(zip(columns.split(), fields.split(), strict=True))
    return Table(
        name,
        struct,
        mapping,
        frozenset(kinds.get("json", "").split()),
        frozenset(kinds.get("booleans", "").split()),
    )


USERS = _table(
    "users",
    User,
    "id name nickname user_type metadata created_at updated_at",
    "user_id name nickname user_type metadata created_at updated_at",
    json="metadata",
)
CONVERSATIONS = _table(
    "conversations",
    Conversation,
    "id user_id title metadata started_at",
    "conversation_id user_id title metadata started_at",
    json="metadata",
)
MESSAGES = _table(
    "messages",
    Message,
    "id conversation_id user_id role text timestamp sentiment metadata",
    "message_id conversation_id user_id role text timestamp sentiment metadata",
    json="metadata",
)
FEEDBACK = _table(
    "feedback_events",
    FeedbackEvent,
    "id user_id event_type message_id skill_id reward reason free_text classified_categories metadata "
    "timestamp processed",
    "event_id user_id event_type message_id skill_id reward reason free_text classified_categories metadata "
    "timestamp processed",
    json="classified_categories metadata",
    booleans="processed",
)
TASKS = _table(
    "tasks",
    Task,
    "id user_id name task_type schedule config status enabled result error created_at updated_at",
    "task_id user_id name task_type schedule config status enabled result error created_at updated_at",
    json="config result",
    booleans="enabled",
)
SESSIONS = _table(
    "session_metadata",
    Session,
    "id user_id conversation_id status started_at ended_at summary metadata",
    "session_id user_id conversation_id status started_at ended_at summary metadata",
    json="metadata",
)


def insert(txn: Txn, table: Table, item: msgspec.Struct) -> bool:
    """Inserts ``item`` unless its id exists; True when a row was written."""
    marks = ", ".join("?" * len(table.columns))
    sql = (
        f"INSERT INTO {table.name} ({', '.join(table.columns)}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING"
    )
    return bool(txn.execute(sql, table.values(item)).rowcount)


def get(txn: Txn, table: Table, item_id: str) -> Any:
    """The stored Struct with that id, or None."""
    row = txn.one(f"{table.select} WHERE id = ?", (item_id,))
    return table.load(row) if row else None


def update(txn: Txn, table: Table, item: msgspec.Struct, fields: Sequence[str]) -> None:
    """Writes ``fields`` of ``item`` to its row."""
    columns = [col for col, f in table.columns.items() if f in fields]
    by_column = dict(zip(table.columns, table.values(item), strict=True))
    assignments = ", ".join(f"{col} = ?" for col in columns)
    txn.execute(
        f"UPDATE {table.name} SET {assignments} WHERE id = ?",
        (*(by_column[col] for col in columns), by_column["id"]),
    )


# -- messages ------------------------------------------------------------------------------------------------


def message_page(txn: Txn, conversation_id: str, limit: int, offset: int) -> tuple[list[Message], int]:
    """One page of a conversation's messages in order, and how many it has in all."""
    rows = txn.all(
        f"{MESSAGES.select} WHERE conversation_id = ? ORDER BY timestamp, seq LIMIT ? OFFSET ?",
        (conversation_id, limit, offset),
    )
    total = txn.one("SELECT count(*) FROM messages WHERE conversation_id = ?", (conversation_id,))
    return [MESSAGES.load(r) for r in rows], int(total[0])


# -- semantic facts: the temporal fields live in the JSON column temporal_metadata (as in AICO's AMS) --

_FACT_COLUMNS = "id, user_id, text, fact_type, category, metadata, temporal_metadata"
_TEMPORAL = (
    "created_at",
    "last_updated",
    "last_accessed",
    "access_count",
    "confidence",
    "version",
    "superseded_by",
    "supersedes",
)
CURRENT = "json_extract(temporal_metadata, '$.superseded_by') IS NULL"
"""Written exactly as in the index idx_semantic_facts_current, so the planner uses it."""


def _fact(row: Sequence[Any]) -> Fact:
    temporal = load(row[6])
    return Fact(
        fact_id=row[0],
        user_id=row[1],
        text=row[2],
        fact_type=row[3],
        category=row[4],
        metadata=load(row[5]),
        **{k: temporal.get(k) for k in _TEMPORAL},
    )


def insert_fact(txn: Txn, fact: Fact) -> bool:
    temporal = dump({k: getattr(fact, k) for k in _TEMPORAL})
    cur = txn.execute(
        f"INSERT INTO semantic_facts ({_FACT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO NOTHING",
        (fact.fact_id, fact.user_id, fact.text, fact.fact_type, fact.category, dump(fact.metadata), temporal),
    )
    return bool(cur.rowcount)


def get_fact(txn: Txn, fact_id: str) -> Fact | None:
    row = txn.one(f"SELECT {_FACT_COLUMNS} FROM semantic_facts WHERE id = ?", (fact_id,))
    return _fact(row) if row else None


def mark_superseded(txn: Txn, fact_id: str, by: str, now: str) -> None:
    txn.execute(
        "UPDATE semantic_facts SET temporal_metadata = json_set(temporal_metadata, "
        "'$.superseded_by', ?, '$.last_updated', ?) WHERE id = ?",
        (by, now, fact_id),
    )


def list_facts(
    txn: Txn,
    user_id: str,
    *,
    fact_type: str = "",
    category: str = "",
    min_confidence: float = 0.0,
    include_superseded: bool = False,
    limit: int = 100,
    offset: int = 0,
) -> list[Fact]:
    where: list[str] = ["user_id = ?"]
    params: list[Any] = [user_id]
    if not include_superseded:
        where.append(CURRENT)
    for column, value in (("fact_type", fact_type), ("category", category)):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if min_confidence > 0:
        where.append("json_extract(temporal_metadata, '$.confidence') >= ?")
        params.append(min_confidence)
    rows = txn.all(
        f"SELECT {_FACT_COLUMNS} FROM semantic_facts WHERE {' AND '.join(where)} "
        "ORDER BY seq LIMIT ? OFFSET ?",
        (*params, limit, offset),
    )
    return [_fact(r) for r in rows]


def touch_facts(txn: Txn, fact_ids: Sequence[str], now: str) -> None:
    """Records an access: last_accessed = now, access_count + 1."""
    for start in range(0, len(fact_ids), 500):
        chunk = fact_ids[start : start + 500]
        txn.execute(
            "UPDATE semantic_facts SET temporal_metadata = json_set(temporal_metadata, "
            "'$.last_accessed', ?, '$.access_count', json_extract(temporal_metadata, '$.access_count') + 1) "
            f"WHERE id IN ({', '.join('?' * len(chunk))})",
            (now, *chunk),
        )


# -- logs, consolidation state -------------------------------------------------------------------------------


def insert_log(
    txn: Txn,
    log_id: str,
    timestamp: str,
    level: str,
    message: str,
    *,
    module: str,
    user_id: str,
    session_id: str,
    trace_id: str,
    extra: dict[str, Any],
) -> bool:
    cur = txn.execute(
        "INSERT INTO logs (id, timestamp, level, module, message, user_id, session_id, trace_id, "
        "extra) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        (log_id, timestamp, level, module, message, user_id, session_id, trace_id, dump(extra)),
    )
    return bool(cur.rowcount)


def save_consolidation_state(txn: Txn, state_id: str, state: dict[str, Any], now: str) -> None:
    txn.execute(
        "INSERT INTO consolidation_state (id, state_json, updated_at) VALUES (?, ?, ?) ON CONFLICT (id) "
        "DO UPDATE SET state_json = excluded.state_json, updated_at = excluded.updated_at",
        (state_id, dump(state), now),
    )


def get_consolidation_state(txn: Txn, state_id: str) -> tuple[dict[str, Any], str] | None:
    row = txn.one("SELECT state_json, updated_at FROM consolidation_state WHERE id = ?", (state_id,))
    return (load(row[0]), row[1]) if row else None


# -- full-text search ----------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")


def fts_query(text: str, match: str) -> str:
    """An FTS5 query of the words of ``text``, each quoted, so no FTS syntax from the caller gets through."""
    return (" OR " if match == "any" else " ").join(f'"{w}"' for w in _WORD.findall(text))


def search_messages(
    txn: Txn, query: str, *, user_id: str, conversation_id: str, limit: int
) -> list[SearchHit]:
    where, params = ["messages_fts MATCH ?"], [query]
    for column, value in (("m.user_id", user_id), ("m.conversation_id", conversation_id)):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    rows = txn.all(
        "SELECT m.id, m.user_id, m.text, snippet(messages_fts, 0, '[', ']', '...', 12), bm25(messages_fts), "
        "m.conversation_id, m.timestamp FROM messages_fts JOIN messages m ON m.seq = messages_fts.rowid "
        f"WHERE {' AND '.join(where)} ORDER BY bm25(messages_fts) LIMIT ?",
        (*params, limit),
    )
    return [
        SearchHit(
            source="messages",
            id=r[0],
            user_id=r[1],
            text=r[2],
            snippet=r[3],
            score=r[4],
            conversation_id=r[5],
            timestamp=r[6],
        )
        for r in rows
    ]


def search_facts(txn: Txn, query: str, *, user_id: str, limit: int) -> list[SearchHit]:
    where = ["facts_fts MATCH ?", "json_extract(f.temporal_metadata, '$.superseded_by') IS NULL"]
    params = [query]
    if user_id:
        where.append("f.user_id = ?")
        params.append(user_id)
    rows = txn.all(
        "SELECT f.id, f.user_id, f.text, snippet(facts_fts, 0, '[', ']', '...', 12), bm25(facts_fts), "
        "json_extract(f.temporal_metadata, '$.last_updated') "
        "FROM facts_fts JOIN semantic_facts f ON f.seq = facts_fts.rowid "
        f"WHERE {' AND '.join(where)} ORDER BY bm25(facts_fts) LIMIT ?",
        (*params, limit),
    )
    return [
        SearchHit(source="facts", id=r[0], user_id=r[1], text=r[2], snippet=r[3], score=r[4], timestamp=r[5])
        for r in rows
    ]
