"""The libSQL worker: structured data (users, conversations, facts, feedback, logs, tasks, sessions).

One file ``<data_dir>/membus.db`` in WAL mode, migrated by the schema registry at
open. The connection runs with ``isolation_level=None``: every transaction is an
explicit ``BEGIN IMMEDIATE`` .. ``COMMIT``, and every statement goes through
``Txn.execute`` / ``run``, where driver errors are translated (``translate_error``).
Times stored are the request envelope's creation time unless the caller gives one,
and ids left empty are the envelope id, so replaying the log gives the same rows.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import libsql
import msgspec
import structlog

import contracts.structured as c
from bus.keys import KeyRing, subkey
from bus.sealing import open_sealed, seal
from contracts.errors import IntegrityError, NotFound, StoreError, StoreUnavailable, ValidationError
from contracts.inventory import InventoryItem, InventoryPage
from schemas.registry import apply_all
from workers import libsql_repos as repo
from workers.base import Backend, Context, handles

log = structlog.get_logger("membus.libsql")

DB_FILE = "membus.db"
S = TypeVar("S", bound=msgspec.Struct)


class TransactionLost(RuntimeError):
    """The database ended the batch transaction on its own (e.g. after an I/O error); the batch is retried."""


def translate_error(exc: Exception, sql: str = "") -> BaseException:
    """The one place where libsql driver errors become membus errors.

    Constraint violations and unreadable files are IntegrityError, other SQL errors StoreError (answered
    with ``.failed``). A full disk, an I/O error or a database locked by another process is the store's
    trouble, not the message's: StoreUnavailable, and the runtime retries the whole batch until it works.
    """
    text = str(exc)
    lowered = text.lower()
    statement = " ".join(sql.split())[:200]
    if "constraint failed" in lowered:
        return IntegrityError(text, sql=statement)
    if "file is not a database" in lowered or "malformed" in lowered:
        return IntegrityError(f"{text} (wrong encryption key or corrupt file)", sql=statement)
    if any(s in lowered for s in ("database or disk is full", "database is locked", "busy", "disk i/o error")):
        return StoreUnavailable(f"libsql: {text}", sql=statement)
    return StoreError(text, sql=statement)


_DRIVER_ERRORS = (ValueError, libsql.Error)


def run(conn: Any, sql: str, params: Sequence[Any] = ()) -> Any:
    """Executes one statement; driver errors are translated."""
    try:
        return conn.execute(sql, tuple(params))
    except _DRIVER_ERRORS as exc:
        raise translate_error(exc, sql) from exc


def file_key(keyring: KeyRing, generation: int | None = None) -> bytes:
    """The libsql file key of a generation (default: the current one), derived from the store key."""
    key = keyring.current if generation is None else next(
        k for k in keyring.values() if k.generation == generation)
    return subkey(key, "libsql-file")


def connect(path: Path | str, encryption_key: bytes | str | None = None) -> Any:
    """A libsql connection in explicit-transaction mode (``isolation_level=None``).

    libsql takes the key as text and hands its UTF-8 bytes to SQLite3 Multiple Ciphers (aes256cbc), which
    derives the page key from it: bytes are passed as their hex string, 64 characters carrying 256 random
    bits, so the cipher's fixed-salt key derivation adds no weakness.
    """
    key = encryption_key.hex() if isinstance(encryption_key, bytes) else encryption_key
    kwargs: dict[str, Any] = {"isolation_level": None}
    if key:
        kwargs["encryption_key"] = key
    return libsql.connect(str(path), **kwargs)


class Txn:
    """The batch transaction as handlers and repositories see it."""

    def __init__(self, conn: Any, sealer: repo.ColumnSealer | None = None) -> None:
        self.conn = conn
        self.sealer = sealer
        """Seals sensitive columns when the store is encrypted (workers/libsql_repos.py)."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if not self.conn.in_transaction:
            raise TransactionLost("the batch transaction is no longer open")
        return run(self.conn, sql, params)

    def one(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(self.execute(sql, params).fetchall())


def iso_time(ns: int) -> str:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def now_of(ctx: Context) -> str:
    """The request's creation time: the same on every replay of the log."""
    return iso_time(ctx.envelope.ts or time.time_ns())


def given_time(value: str, ctx: Context, field: str) -> str:
    """A caller's ISO-8601 time in the stored form, or the request's time when empty."""
    if not value:
        return now_of(ctx)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValidationError(
            f"invalid payload for topic {ctx.envelope.topic!r} field {field!r}: expected an "
            f"ISO-8601 time, got {value!r}",
            topic=ctx.envelope.topic,
            field=field,
            expected="ISO-8601 time",
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    if not 0 <= parsed.timestamp() <= c.UNIX_SECONDS_MAX:  # what the change events it ends up in can carry
        raise ValidationError(
            f"invalid payload for topic {ctx.envelope.topic!r} field {field!r}: {value!r} is not between 1970 "
            "and the year 3000", topic=ctx.envelope.topic, field=field, expected="a time from 1970 to 3000")
    return parsed.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _not_found(ctx: Context, entity: str, entity_id: str) -> NotFound:
    return NotFound(
        f"{entity} {entity_id!r} not found", topic=ctx.envelope.topic, entity=entity, id=entity_id
    )


def insert_once(txn: Txn, ctx: Context, table: repo.Table, item: S, same: Sequence[str]) -> tuple[S, bool]:
    """Stores ``item`` once: the same request again returns the stored row (created False);
    other content under an existing id is a conflict (IntegrityError)."""
    if repo.insert(txn, table, item):
        return item, True
    item_id = getattr(item, next(iter(table.columns.values())))
    existing = repo.get(txn, table, item_id)
    if existing is None or any(getattr(existing, f) != getattr(item, f) for f in same):
        raise IntegrityError(
            f"{table.name} row {item_id!r} already exists with different content",
            topic=ctx.envelope.topic,
            table=table.name,
            id=item_id,
        )
    return existing, False


def _started_by_a_message(existing: c.Conversation, start: c.Conversation) -> bool:
    """A conversation a message started (no title, no metadata) that this start of the same user describes."""
    return (existing.user_id == start.user_id and not existing.title and not existing.metadata
            and bool(start.title or start.metadata))


def fact_event(op: Literal["created", "superseded"], fact: c.Fact) -> c.FactChanged:
    return c.FactChanged(op=op, updated_at=fact.last_updated, **msgspec.structs.asdict(fact))


class LibsqlBackend(Backend):
    name = "libsql"
    patterns: ClassVar[tuple[str, ...]] = ()  # set below the class: exactly the topics handled here

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        super().__init__(data_dir, **settings)
        self.path = self.data_dir / DB_FILE
        self.conn: Any = None
        ring: KeyRing | None = settings.get("encryption")
        self.sealer = repo.ColumnSealer(ring) if ring is not None else None
        self.file_key: bytes | str | None = file_key(ring) if ring is not None else settings.get("encryption_key")
        self._savepoints = itertools.count(1)

    # -- lifecycle -----------------------------------------------------------------------------------------

    def open(self) -> None:
        """Opens the file (WAL, busy timeout, foreign keys on) and brings its schema to the latest version."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # NORMAL in WAL mode: an OS crash can roll back the newest commits, position included (the file stays
        # consistent); the worker resumes from its older position and the log re-applies them
        synchronous = str(self.settings.get("synchronous", "NORMAL")).upper()
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValidationError(
                f"invalid libsql setting synchronous={synchronous!r}",
                field="synchronous",
                expected="OFF, NORMAL, FULL or EXTRA",
            )
        conn = connect(self.path, self.file_key)
        try:
            run(conn, "PRAGMA journal_mode = WAL").fetchall()
            run(conn, f"PRAGMA busy_timeout = {int(self.settings.get('busy_timeout_ms', 5000))}").fetchall()
            run(conn, "PRAGMA foreign_keys = ON")
            run(conn, f"PRAGMA synchronous = {synchronous}")
            applied = apply_all(conn)
        except BaseException:
            conn.close()
            raise
        self.conn = conn
        log.info("libsql.open", path=str(self.path), migrated={k: v for k, v in applied.items() if v})

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _open_conn(self) -> Any:
        if self.conn is None:
            raise StoreError(f"the libsql store at {self.path} is not open")
        return self.conn

    # -- transactions, position, outbox ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[Txn]:
        conn = self._open_conn()
        run(conn, "BEGIN IMMEDIATE")
        try:
            yield Txn(conn, self.sealer)
            if not conn.in_transaction:
                raise TransactionLost("the batch transaction ended before its commit; nothing was committed")
            run(conn, "COMMIT")
        except BaseException:
            if conn.in_transaction:
                run(conn, "ROLLBACK")
            raise

    @contextmanager
    def savepoint(self, txn: Txn) -> Iterator[None]:
        name = f"sp{next(self._savepoints)}"
        txn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            if txn.conn.in_transaction:  # else the database already ended the whole transaction
                txn.execute(f"ROLLBACK TO {name}")
                txn.execute(f"RELEASE {name}")
            raise
        txn.execute(f"RELEASE {name}")

    def load_position(self) -> int:
        row = run(
            self._open_conn(), "SELECT seq FROM worker_position WHERE worker = ?", (self.name,)
        ).fetchone()
        return int(row[0]) if row else 0

    def save_position(self, txn: Txn, seq: int) -> None:
        txn.execute(
            "INSERT INTO worker_position (worker, seq) VALUES (?, ?) "
            "ON CONFLICT (worker) DO UPDATE SET seq = excluded.seq",
            (self.name, seq),
        )

    def outbox_add(self, txn: Txn, seq: int, items: list[bytes]) -> None:
        body = msgspec.msgpack.encode(items)
        if self.sealer is not None:
            body = seal(self.sealer.keyring.current, body, b"libsql|outbox|%d" % seq)
        txn.execute("INSERT OR REPLACE INTO outbox (seq, items) VALUES (?, ?)", (seq, body))

    def outbox_pending(self) -> list[tuple[int, list[bytes]]]:
        rows = run(self._open_conn(), "SELECT seq, items FROM outbox ORDER BY seq").fetchall()
        if self.sealer is not None:
            ring = self.sealer.keyring
            rows = [(seq, open_sealed(ring, items, b"libsql|outbox|%d" % seq)) for seq, items in rows]
        return [(int(seq), msgspec.msgpack.decode(items, type=list[bytes])) for seq, items in rows]

    def outbox_remove(self, seqs: list[int]) -> None:
        conn = self._open_conn()
        for start in range(0, len(seqs), 500):
            chunk = seqs[start : start + 500]
            run(conn, f"DELETE FROM outbox WHERE seq IN ({', '.join('?' * len(chunk))})", chunk)

    def stats(self) -> dict[str, Any]:
        """Cheap figures only (the runtime asks every second): no full-table counts."""
        conn = self._open_conn()
        size = sum(p.stat().st_size for p in self.data_dir.glob(DB_FILE + "*") if p.is_file())
        outbox = run(conn, "SELECT count(*) FROM outbox").fetchone()[0]
        messages = run(conn, "SELECT max(seq) FROM messages").fetchone()[0]
        facts = run(conn, "SELECT max(seq) FROM semantic_facts").fetchone()[0]
        return {
            "path": str(self.path),
            "bytes": size,
            "position": self.load_position(),
            "outbox": int(outbox),
            "messages_stored": int(messages or 0),
            "facts_stored": int(facts or 0),
        }

    # -- users -----------------------------------------------------------------------------------------------

    @handles("user.create.request")
    def create_user(self, txn: Txn, p: c.UserCreate, ctx: Context) -> c.User:
        now = now_of(ctx)
        user = c.User(
            user_id=p.user_id or ctx.envelope.id,
            name=p.name,
            nickname=p.nickname,
            user_type=p.user_type,
            metadata=p.metadata,
            created_at=now,
            updated_at=now,
        )
        return insert_once(txn, ctx, repo.USERS, user, ("name", "nickname", "user_type", "metadata"))[0]

    @handles("user.get.request")
    def get_user(self, txn: Txn, p: c.UserGet, ctx: Context) -> c.User:
        user: c.User | None = repo.get(txn, repo.USERS, p.user_id)
        if user is None:
            raise _not_found(ctx, "user", p.user_id)
        return user

    # -- conversations and messages --------------------------------------------------------------------------

    @handles("conversation.start.request")
    def start_conversation(self, txn: Txn, p: c.ConversationStart, ctx: Context) -> c.Conversation:
        conv = c.Conversation(
            conversation_id=p.conversation_id or ctx.envelope.id,
            user_id=p.user_id,
            title=p.title,
            metadata=p.metadata,
            started_at=now_of(ctx),
        )
        existing: c.Conversation | None = repo.get(txn, repo.CONVERSATIONS, conv.conversation_id)
        if existing is not None and _started_by_a_message(existing, conv):  # the start's title and metadata count
            conv = msgspec.structs.replace(existing, title=conv.title, metadata=conv.metadata)
            repo.update(txn, repo.CONVERSATIONS, conv, ("title", "metadata"))
            return conv
        return insert_once(txn, ctx, repo.CONVERSATIONS, conv, ("user_id", "title", "metadata"))[0]

    @handles("conversation.message.append.request")
    def append_message(self, txn: Txn, p: c.MessageAppend, ctx: Context) -> c.Message:
        msg = c.Message(
            message_id=p.message_id or ctx.envelope.id,
            conversation_id=p.conversation_id,
            user_id=p.user_id,
            role=p.role,
            text=p.text,
            timestamp=given_time(p.timestamp, ctx, "timestamp"),
            sentiment=p.sentiment,
            metadata=p.metadata,
        )
        implicit = c.Conversation(
            conversation_id=p.conversation_id,
            user_id=p.user_id,
            title="",
            metadata={},
            started_at=msg.timestamp,
        )
        repo.insert(txn, repo.CONVERSATIONS, implicit)  # no-op when the conversation was started
        msg, created = insert_once(
            txn, ctx, repo.MESSAGES, msg, ("conversation_id", "user_id", "role", "text")
        )
        if created:
            created_at = datetime.fromisoformat(msg.timestamp).timestamp()
            event = c.MessageChanged(op="created", created_at=created_at, **msgspec.structs.asdict(msg))
            ctx.emit("conversation.message.changed", event)
        return msg

    @handles("conversation.history.request")
    def conversation_history(self, txn: Txn, p: c.ConversationHistory, ctx: Context) -> c.MessagePage:
        if repo.get(txn, repo.CONVERSATIONS, p.conversation_id) is None:
            raise _not_found(ctx, "conversation", p.conversation_id)
        keys = {}
        for name in ("after", "before"):
            if message_id := getattr(p, name):
                keys[name] = repo.message_key(txn, p.conversation_id, message_id)
                if keys[name] is None:
                    raise NotFound(f"{name}: message {message_id!r} is not in conversation {p.conversation_id!r}",
                                   topic=ctx.envelope.topic, field=name, entity="message", id=message_id)
        messages, total, more = repo.message_page(txn, p.conversation_id, p.limit, p.offset, newest=p.newest, **keys)
        return c.MessagePage(
            conversation_id=p.conversation_id,
            messages=messages,
            total=total,
            offset=p.offset,
            has_more=more,
        )

    # -- semantic facts --------------------------------------------------------------------------------------

    def _new_fact(self, txn: Txn, ctx: Context, fact: c.Fact, supersedes: str) -> c.Fact:
        """Stores ``fact``; when it supersedes a current fact, that one points at it (superseded_by)."""
        old = None
        if supersedes:
            old = repo.get_fact(txn, supersedes)
            if old is None:
                raise _not_found(ctx, "fact", supersedes)
            if old.superseded_by not in (None, fact.fact_id):
                raise IntegrityError(
                    f"fact {supersedes!r} was already superseded by {old.superseded_by!r}",
                    topic=ctx.envelope.topic,
                    id=supersedes,
                    superseded_by=old.superseded_by,
                )
            if old.user_id != fact.user_id:
                raise ValidationError(
                    f"fact {supersedes!r} belongs to another user than {fact.user_id!r}",
                    topic=ctx.envelope.topic,
                    field="supersedes",
                    expected="a fact of the same user",
                )
            fact = msgspec.structs.replace(fact, version=old.version + 1, supersedes=supersedes)
        if not repo.insert_fact(txn, fact):
            existing = repo.get_fact(txn, fact.fact_id)
            if existing is None or (existing.user_id, existing.text, existing.supersedes) != (
                fact.user_id,
                fact.text,
                fact.supersedes,
            ):
                raise IntegrityError(
                    f"fact {fact.fact_id!r} already exists with different content",
                    topic=ctx.envelope.topic,
                    table="semantic_facts",
                    id=fact.fact_id,
                )
            return existing
        ctx.emit("memory.fact.changed", fact_event("created", fact))
        if old is not None:
            repo.mark_superseded(txn, old.fact_id, fact.fact_id, fact.created_at)
            replaced = msgspec.structs.replace(old, superseded_by=fact.fact_id, last_updated=fact.created_at)
            ctx.emit("memory.fact.changed", fact_event("superseded", replaced))
        return fact

    @handles("memory.store.request")
    def store_fact(self, txn: Txn, p: c.FactStore, ctx: Context) -> c.Fact:
        now = now_of(ctx)
        fact = c.Fact(
            fact_id=p.fact_id or ctx.envelope.id,
            user_id=p.user_id,
            text=p.text,
            fact_type=p.fact_type,
            category=p.category,
            confidence=p.confidence,
            metadata=p.metadata,
            created_at=now,
            last_updated=now,
            last_accessed=now,
            access_count=0,
            version=1,
        )
        return self._new_fact(txn, ctx, fact, p.supersedes)

    @handles("memory.fact.update.request")
    def update_fact(self, txn: Txn, p: c.FactUpdate, ctx: Context) -> c.Fact:
        old = repo.get_fact(txn, p.fact_id)
        if old is None:
            raise _not_found(ctx, "fact", p.fact_id)
        now = now_of(ctx)
        kept = {
            k: getattr(old, k) if getattr(p, k) is None else getattr(p, k)
            for k in ("text", "fact_type", "category", "confidence", "metadata")
        }
        fact = c.Fact(
            fact_id=p.new_fact_id or ctx.envelope.id,
            user_id=old.user_id,
            created_at=now,
            last_updated=now,
            last_accessed=now,
            access_count=0,
            version=old.version + 1,
            **kept,
        )
        return self._new_fact(txn, ctx, fact, p.fact_id)

    @handles("memory.facts.request")
    def list_facts(self, txn: Txn, p: c.FactsQuery, ctx: Context) -> c.FactList:
        facts = repo.list_facts(
            txn,
            p.user_id,
            fact_type=p.fact_type,
            category=p.category,
            min_confidence=p.min_confidence,
            include_superseded=p.include_superseded,
            limit=p.limit,
            offset=p.offset,
        )
        if p.touch and facts:
            now = now_of(ctx)
            repo.touch_facts(txn, [f.fact_id for f in facts], now)
            facts = [
                msgspec.structs.replace(f, last_accessed=now, access_count=f.access_count + 1) for f in facts
            ]
        return c.FactList(user_id=p.user_id, facts=facts)

    @handles("memory.search.text.request")
    def search_text(self, txn: Txn, p: c.TextSearch, ctx: Context) -> c.SearchResults:
        """Messages and facts ranked together by bm25 (facts are skipped when a conversation is given)."""
        query = repo.fts_query(p.query, p.match)
        hits: list[c.SearchHit] = []
        if query and "messages" in p.sources:
            hits += repo.search_messages(
                txn, query, user_id=p.user_id, conversation_id=p.conversation_id, limit=p.limit
            )
        if query and "facts" in p.sources and not p.conversation_id:
            hits += repo.search_facts(txn, query, user_id=p.user_id, limit=p.limit)
        hits.sort(key=lambda h: h.score)
        return c.SearchResults(query=p.query, hits=hits[: p.limit])

    # -- feedback, logs --------------------------------------------------------------------------------------

    @handles("feedback.record.request")
    def record_feedback(self, txn: Txn, p: c.FeedbackRecord, ctx: Context) -> c.FeedbackEvent:
        ev = c.FeedbackEvent(
            event_id=p.event_id or ctx.envelope.id,
            user_id=p.user_id,
            event_type=p.event_type,
            message_id=p.message_id,
            skill_id=p.skill_id,
            reward=p.reward,
            reason=p.reason,
            free_text=p.free_text,
            classified_categories=p.classified_categories,
            metadata=p.metadata,
            timestamp=given_time(p.timestamp, ctx, "timestamp"),
            processed=False,
        )
        ev, created = insert_once(
            txn, ctx, repo.FEEDBACK, ev, ("user_id", "event_type", "message_id", "reward")
        )
        if created:
            ctx.emit("feedback.event.changed", ev)
        return ev

    @handles("log.write.request")
    def write_log(self, txn: Txn, p: c.LogWrite, ctx: Context) -> c.LogWritten:
        log_id, ts = ctx.envelope.id, given_time(p.timestamp, ctx, "timestamp")
        repo.insert_log(
            txn,
            log_id,
            ts,
            p.level,
            p.message,
            module=p.module,
            user_id=p.user_id,
            session_id=p.session_id,
            trace_id=p.trace_id,
            extra=p.extra,
        )
        return c.LogWritten(log_id=log_id, timestamp=ts)

    # -- tasks, sessions, consolidation ----------------------------------------------------------------------

    @handles("task.create.request")
    def create_task(self, txn: Txn, p: c.TaskCreate, ctx: Context) -> c.Task:
        now = now_of(ctx)
        task = c.Task(
            task_id=p.task_id or ctx.envelope.id,
            user_id=p.user_id,
            name=p.name,
            task_type=p.task_type,
            schedule=p.schedule,
            config=p.config,
            status="pending",
            enabled=p.enabled,
            result={},
            error="",
            created_at=now,
            updated_at=now,
        )
        return insert_once(txn, ctx, repo.TASKS, task, ("name", "task_type", "user_id", "config"))[0]

    @handles("task.update.request")
    def update_task(self, txn: Txn, p: c.TaskUpdate, ctx: Context) -> c.Task:
        task: c.Task | None = repo.get(txn, repo.TASKS, p.task_id)
        if task is None:
            raise _not_found(ctx, "task", p.task_id)
        changes = {
            k: getattr(p, k)
            for k in ("status", "result", "error", "schedule", "enabled")
            if getattr(p, k) is not None
        }
        task = msgspec.structs.replace(task, updated_at=now_of(ctx), **changes)
        repo.update(txn, repo.TASKS, task, [*changes, "updated_at"])
        return task

    @handles("session.start.request")
    def start_session(self, txn: Txn, p: c.SessionStart, ctx: Context) -> c.Session:
        session = c.Session(
            session_id=p.session_id or ctx.envelope.id,
            user_id=p.user_id,
            conversation_id=p.conversation_id,
            status="active",
            started_at=now_of(ctx),
            ended_at=None,
            summary="",
            metadata=p.metadata,
        )
        return insert_once(txn, ctx, repo.SESSIONS, session, ("user_id", "conversation_id"))[0]

    @handles("session.end.request")
    def end_session(self, txn: Txn, p: c.SessionEnd, ctx: Context) -> c.Session:
        session: c.Session | None = repo.get(txn, repo.SESSIONS, p.session_id)
        if session is None:
            raise _not_found(ctx, "session", p.session_id)
        if session.status == "ended":
            return session
        session = msgspec.structs.replace(session, status="ended", ended_at=now_of(ctx), summary=p.summary)
        repo.update(txn, repo.SESSIONS, session, ("status", "ended_at", "summary"))
        return session

    @handles("consolidation.state.save.request")
    def save_consolidation(self, txn: Txn, p: c.ConsolidationSave, ctx: Context) -> c.ConsolidationState:
        now = now_of(ctx)
        repo.save_consolidation_state(txn, p.state_id, p.state, now)
        return c.ConsolidationState(state_id=p.state_id, state=p.state, updated_at=now)

    @handles("consolidation.state.get.request")
    def get_consolidation(self, txn: Txn, p: c.ConsolidationGet, ctx: Context) -> c.ConsolidationState:
        found = repo.get_consolidation_state(txn, p.state_id)
        if found is None:
            raise _not_found(ctx, "consolidation state", p.state_id)
        return c.ConsolidationState(state_id=p.state_id, state=found[0], updated_at=found[1])

    # -- inventory (membus check) ----------------------------------------------------------------------------

    @handles("structured.inventory.request")
    def inventory(self, txn: Txn, p: c.StructuredInventory, ctx: Context) -> InventoryPage:
        sql = _INVENTORY_SQL[p.kind]
        rows = txn.all(f"{sql} WHERE id > ? ORDER BY id LIMIT ?", (p.cursor, p.limit + 1))
        items = [InventoryItem(id=r[0], group=r[1], ts=_unix(r[2]), current=bool(r[3]), has_text=bool(r[4]))
                 for r in rows[: p.limit]]
        return InventoryPage(kind=p.kind, items=items, cursor=items[-1].id if len(rows) > p.limit else "")


_INVENTORY_SQL = {
    "facts": f"SELECT id, user_id, json_extract(temporal_metadata, '$.created_at'), {repo.CURRENT}, "
             "length(trim(text)) > 0 FROM semantic_facts",
    "messages": "SELECT id, conversation_id, timestamp, 1, length(trim(text)) > 0 FROM messages",
    "feedback": "SELECT id, user_id, timestamp, 1, 1 FROM feedback_events",
}


def _unix(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return 0.0


LibsqlBackend.patterns = tuple(sorted(LibsqlBackend.handlers))


def rekey(data_dir: Path, keyring: KeyRing, old_generation: int) -> int:
    """After ``membus keys rotate`` (worker stopped): the file re-encrypted under the current generation's
    file key, and every sealed column sealed again with the current key; returns the rows resealed."""
    path = Path(data_dir) / DB_FILE
    conn = connect(path, file_key(keyring, old_generation))
    try:
        run(conn, "PRAGMA journal_mode = DELETE").fetchall()  # SQLite3MC rekeys only outside WAL mode
        run(conn, f"PRAGMA rekey = '{file_key(keyring).hex()}'").fetchall()
        run(conn, "PRAGMA journal_mode = WAL").fetchall()
        txn = Txn(conn, repo.ColumnSealer(keyring))
        run(conn, "BEGIN IMMEDIATE")
        done = repo.reseal_all(txn)
        rows = run(conn, "SELECT seq, items FROM outbox").fetchall()
        for seq, items in rows:
            aad = b"libsql|outbox|%d" % seq
            txn.execute("UPDATE outbox SET items = ? WHERE seq = ?",
                        (seal(keyring.current, open_sealed(keyring, items, aad), aad), seq))
        run(conn, "COMMIT")
    finally:
        conn.close()
    log.info("libsql.rekeyed", path=str(path), rows=done + len(rows), generation=keyring.current.generation)
    return done + len(rows)
