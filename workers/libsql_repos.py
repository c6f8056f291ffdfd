"""Repositories of the libSQL store: one small set of functions per data domain.

They run SQL through a ``Txn`` (workers/libsql.py), inside the batch transaction the
runtime opened, and speak the contract Structs of contracts/structured.py. Inserts
never overwrite: ``insert`` returns False when the id already exists, and the handler
decides whether that is the same request again or a conflict.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from bus.keys import KeyRing
from bus.sealing import open_sealed, seal
from contracts.errors import IntegrityError
from contracts.structured import Conversation, Fact, FeedbackEvent, Message, SearchHit, Session, Task, User

if TYPE_CHECKING:
    from workers.libsql import Txn

S = TypeVar("S", bound=msgspec.Struct)


def dump(value: Any) -> str:
    """JSON text of a metadata value (bytes become base64 strings rather than failing)."""
    return msgspec.json.encode(value).decode()


def load(text: str | None) -> Any:
    return msgspec.json.decode(text) if text else {}


class ColumnSealer:
    """AES-256-GCM of sensitive column values, bound to table, row id and column (stored as base64 text).

    The file itself is encrypted by libsql (aes256cbc, no authentication); these seals make a changed
    byte an IntegrityError. Text that FTS5 must tokenize stays a plaintext column (inside the encrypted
    file) and a sealed copy of it is compared on every read (``checked`` columns).
    """

    def __init__(self, keyring: KeyRing) -> None:
        self.keyring = keyring

    def seal(self, table: str, row_id: str, column: str, text: str) -> str:
        blob = seal(self.keyring.current, text.encode(), _aad(table, row_id, column))
        return base64.b64encode(blob).decode()

    def open(self, table: str, row_id: str, column: str, stored: Any) -> str:
        try:
            blob = base64.b64decode(str(stored).encode(), validate=True)
        except (binascii.Error, ValueError):
            raise IntegrityError(f"{table}.{column} of {row_id!r} is not a sealed value", check="encoding",
                                 table=table, column=column) from None
        return open_sealed(self.keyring, blob, _aad(table, row_id, column)).decode()

    def seal_json(self, table: str, row_id: str, column: str, value: Any) -> str:
        """A JSON column's value sealed, stored as a JSON string (the column's json_valid CHECK holds)."""
        return dump(self.seal(table, row_id, column, dump(value)))

    def open_json(self, table: str, row_id: str, column: str, stored: str | None) -> Any:
        return load(self.open(table, row_id, column, load(stored)))


def _aad(table: str, row_id: str, column: str) -> bytes:
    return f"libsql|{table}|{row_id}|{column}".encode()


def _checked(table: str, row_id: str, column: str, plaintext: Any, sealed_copy: Any) -> None:
    if plaintext != sealed_copy:
        raise IntegrityError(f"{table}.{column} of {row_id!r} differs from its sealed copy", check="copy",
                             table=table, column=column)


@dataclass(frozen=True)
class Table:
    """How a contract Struct is stored: its table, and which column holds which field."""

    name: str
    struct: type[msgspec.Struct]
    columns: dict[str, str]
    """column -> Struct field; the first one is the primary key ``id``."""
    json: frozenset[str] = frozenset()
    booleans: frozenset[str] = frozenset()
    sealed: frozenset[str] = frozenset()
    """Columns sealed when the store is encrypted."""
    checked: str = ""
    """A plaintext column (for FTS5) whose value is sealed together with ``metadata``."""

    @property
    def select(self) -> str:
        return f"SELECT {', '.join(self.columns)} FROM {self.name}"

    def values(self, item: msgspec.Struct, sealer: ColumnSealer | None = None) -> tuple[Any, ...]:
        out: list[Any] = []
        row_id = getattr(item, next(iter(self.columns.values())))
        for column, field in self.columns.items():
            value = getattr(item, field)
            if sealer is not None and column in self.sealed:
                if self.checked and column == "metadata":
                    value = [getattr(item, self.columns[self.checked]), value]
                out.append(sealer.seal_json(self.name, row_id, column, value) if column in self.json
                           else sealer.seal(self.name, row_id, column, value))
                continue
            out.append(
                dump(value) if column in self.json else int(value) if column in self.booleans else value
            )
        return tuple(out)

    def load(self, row: Sequence[Any], sealer: ColumnSealer | None = None) -> Any:
        fields: dict[str, Any] = {}
        row_id = row[0]
        for (column, field), value in zip(self.columns.items(), row, strict=True):
            if sealer is not None and column in self.sealed:
                opened: Any = (sealer.open_json(self.name, row_id, column, value) if column in self.json
                               else sealer.open(self.name, row_id, column, value))
                if self.checked and column == "metadata":
                    copy, opened = opened
                    _checked(self.name, row_id, self.checked, fields[self.columns[self.checked]], copy)
                fields[field] = opened
                continue
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
        frozenset(kinds.get("sealed", "").split()),
        kinds.get("checked", ""),
    )


USERS = _table(
    "users",
    User,
    "id name nickname user_type metadata created_at updated_at",
    "user_id name nickname user_type metadata created_at updated_at",
    json="metadata",
    sealed="name nickname metadata",
)
CONVERSATIONS = _table(
    "conversations",
    Conversation,
    "id user_id title metadata started_at",
    "conversation_id user_id title metadata started_at",
    json="metadata",
    sealed="title metadata",
)
MESSAGES = _table(
    "messages",
    Message,
    "id conversation_id user_id role text timestamp sentiment metadata",
    "message_id conversation_id user_id role text timestamp sentiment metadata",
    json="metadata",
    sealed="metadata",
    checked="text",
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
    sealed="reason free_text classified_categories metadata",
)
TASKS = _table(
    "tasks",
    Task,
    "id user_id name task_type schedule config status enabled result error created_at updated_at",
    "task_id user_id name task_type schedule config status enabled result error created_at updated_at",
    json="config result",
    booleans="enabled",
    sealed="config result error",
)
SESSIONS = _table(
    "session_metadata",
    Session,
    "id user_id conversation_id status started_at ended_at summary metadata",
    "session_id user_id conversation_id status started_at ended_at summary metadata",
    json="metadata",
    sealed="summary metadata",
)


def insert(txn: Txn, table: Table, item: msgspec.Struct) -> bool:
    """Inserts ``item`` unless its id exists; True when a row was written."""
    marks = ", ".join("?" * len(table.columns))
    sql = (
        f"INSERT INTO {table.name} ({', '.join(table.columns)}) VALUES ({marks}) ON CONFLICT (id) DO NOTHING"
    )
    return bool(txn.execute(sql, table.values(item, txn.sealer)).rowcount)


def get(txn: Txn, table: Table, item_id: str) -> Any:
    """The stored Struct with that id, or None."""
    row = txn.one(f"{table.select} WHERE id = ?", (item_id,))
    return table.load(row, txn.sealer) if row else None


def update(txn: Txn, table: Table, item: msgspec.Struct, fields: Sequence[str]) -> None:
    """Writes ``fields`` of ``item`` to its row."""
    columns = [col for col, f in table.columns.items() if f in fields]
    by_column = dict(zip(table.columns, table.values(item, txn.sealer), strict=True))
    assignments = ", ".join(f"{col} = ?" for col in columns)
    txn.execute(
        f"UPDATE {table.name} SET {assignments} WHERE id = ?",
        (*(by_column[col] for col in columns), by_column["id"]),
    )


# -- messages ------------------------------------------------------------------------------------------------


def message_page(txn: Txn, conversation_id: str, limit: int, offset: int, after: tuple[str, int] | None = None,
                 before: tuple[str, int] | None = None, newest: bool = False) -> tuple[list[Message], int, bool]:
    """One page of a conversation's messages in order, how many it has in all, and whether there are more past
    the page (in the direction of paging). ``after`` / ``before`` are the (timestamp, seq) keys of messages."""
    where = "conversation_id = ?"
    params: list[Any] = [conversation_id]
    if after is not None:
        where += " AND (timestamp, seq) > (?, ?)"
        params += after
    if before is not None:
        where += " AND (timestamp, seq) < (?, ?)"
        params += before
    order = "DESC" if newest or before is not None else "ASC"
    rows = txn.all(
        f"{MESSAGES.select} WHERE {where} ORDER BY timestamp {order}, seq {order} LIMIT ? OFFSET ?",
        (*params, limit + 1, offset),
    )
    more = len(rows) > limit
    rows = rows[:limit] if order == "ASC" else rows[:limit][::-1]
    total = txn.one("SELECT count(*) FROM messages WHERE conversation_id = ?", (conversation_id,))
    return [MESSAGES.load(r, txn.sealer) for r in rows], int(total[0]), more


def message_key(txn: Txn, conversation_id: str, message_id: str) -> tuple[str, int] | None:
    """Where message ``message_id`` of the conversation sorts: (timestamp, seq)."""
    row = txn.one("SELECT timestamp, seq FROM messages WHERE id = ? AND conversation_id = ?",
                  (message_id, conversation_id))
    return None if row is None else (str(row[0]), int(row[1]))


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


def _fact(row: Sequence[Any], sealer: ColumnSealer | None = None) -> Fact:
    temporal = load(row[6])
    metadata = load(row[5])
    if sealer is not None:  # text (for FTS5) is checked against its sealed copy
        copy, metadata = sealer.open_json("semantic_facts", row[0], "metadata", row[5])
        _checked("semantic_facts", row[0], "text", row[2], copy)
    return Fact(
        fact_id=row[0],
        user_id=row[1],
        text=row[2],
        fact_type=row[3],
        category=row[4],
        metadata=metadata,
        **{k: temporal.get(k) for k in _TEMPORAL},
    )


def insert_fact(txn: Txn, fact: Fact) -> bool:
    temporal = dump({k: getattr(fact, k) for k in _TEMPORAL})
    metadata = (dump(fact.metadata) if txn.sealer is None
                else txn.sealer.seal_json("semantic_facts", fact.fact_id, "metadata", [fact.text, fact.metadata]))
    cur = txn.execute(
        f"INSERT INTO semantic_facts ({_FACT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (id) DO NOTHING",
        (fact.fact_id, fact.user_id, fact.text, fact.fact_type, fact.category, metadata, temporal),
    )
    return bool(cur.rowcount)


def get_fact(txn: Txn, fact_id: str) -> Fact | None:
    row = txn.one(f"SELECT {_FACT_COLUMNS} FROM semantic_facts WHERE id = ?", (fact_id,))
    return _fact(row, txn.sealer) if row else None


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
    return [_fact(r, txn.sealer) for r in rows]


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
        (log_id, timestamp, level, module, message, user_id, session_id, trace_id, dump(extra))
        if txn.sealer is None
        else (log_id, timestamp, level, module, txn.sealer.seal("logs", log_id, "message", message), user_id,
              session_id, trace_id, txn.sealer.seal_json("logs", log_id, "extra", extra)),
    )
    return bool(cur.rowcount)


def save_consolidation_state(txn: Txn, state_id: str, state: dict[str, Any], now: str) -> None:
    txn.execute(
        "INSERT INTO consolidation_state (id, state_json, updated_at) VALUES (?, ?, ?) ON CONFLICT (id) "
        "DO UPDATE SET state_json = excluded.state_json, updated_at = excluded.updated_at",
        (state_id, dump(state) if txn.sealer is None
         else txn.sealer.seal_json("consolidation_state", state_id, "state_json", state), now),
    )


def get_consolidation_state(txn: Txn, state_id: str) -> tuple[dict[str, Any], str] | None:
    row = txn.one("SELECT state_json, updated_at FROM consolidation_state WHERE id = ?", (state_id,))
    if not row:
        return None
    if txn.sealer is None:
        return load(row[0]), row[1]
    return txn.sealer.open_json("consolidation_state", state_id, "state_json", row[0]), row[1]


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
        "m.conversation_id, m.timestamp, m.metadata FROM messages_fts JOIN messages m ON m.seq = messages_fts.rowid "
        f"WHERE {' AND '.join(where)} ORDER BY bm25(messages_fts) LIMIT ?",
        (*params, limit),
    )
    if txn.sealer is not None:
        for r in rows:
            _checked("messages", r[0], "text", r[2], txn.sealer.open_json("messages", r[0], "metadata", r[7])[0])
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
        "json_extract(f.temporal_metadata, '$.last_updated'), f.metadata "
        "FROM facts_fts JOIN semantic_facts f ON f.seq = facts_fts.rowid "
        f"WHERE {' AND '.join(where)} ORDER BY bm25(facts_fts) LIMIT ?",
        (*params, limit),
    )
    if txn.sealer is not None:
        for r in rows:
            copy = txn.sealer.open_json("semantic_facts", r[0], "metadata", r[6])[0]
            _checked("semantic_facts", r[0], "text", r[2], copy)
    return [
        SearchHit(source="facts", id=r[0], user_id=r[1], text=r[2], snippet=r[3], score=r[4], timestamp=r[5])
        for r in rows
    ]


# -- key rotation ---------------------------------------------------------------------------------------------


def reseal_all(txn: Txn) -> int:
    """Every sealed value opened (any generation the sealer's keyring holds) and sealed with its current key."""
    sealer = txn.sealer
    assert sealer is not None
    done = 0
    for table in (USERS, CONVERSATIONS, MESSAGES, FEEDBACK, TASKS, SESSIONS):
        for row in txn.all(table.select):
            item = table.load(row, sealer)
            update(txn, table, item, [table.columns[c] for c in table.sealed])
            done += 1
    for row in txn.all(f"SELECT {_FACT_COLUMNS} FROM semantic_facts"):
        fact = _fact(row, sealer)
        metadata = sealer.seal_json("semantic_facts", fact.fact_id, "metadata", [fact.text, fact.metadata])
        txn.execute("UPDATE semantic_facts SET metadata = ? WHERE id = ?", (metadata, fact.fact_id))
        done += 1
    for log_id, message, extra in txn.all("SELECT id, message, extra FROM logs"):
        txn.execute("UPDATE logs SET message = ?, extra = ? WHERE id = ?", (
            sealer.seal("logs", log_id, "message", sealer.open("logs", log_id, "message", message)),
            sealer.seal_json("logs", log_id, "extra", sealer.open_json("logs", log_id, "extra", extra)), log_id))
        done += 1
    for state_id, state in txn.all("SELECT id, state_json FROM consolidation_state"):
        opened = sealer.open_json("consolidation_state", state_id, "state_json", state)
        txn.execute("UPDATE consolidation_state SET state_json = ? WHERE id = ?",
                    (sealer.seal_json("consolidation_state", state_id, "state_json", opened), state_id))
        done += 1
    return done
