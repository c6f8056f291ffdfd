"""The analytics worker: DuckDB tables fed in bulk by the event stream, and questions asked over them.

DuckDB has no savepoints, and a failed statement aborts its whole transaction. So
handlers never write: they queue rows on the transaction object (a failing message
drops its own rows), and the transaction writes every table of the batch with one
upserting appender per table, then the outbox and the position, between one BEGIN and
COMMIT. Rows are keyed by their natural ids, so a redelivered message changes nothing.
``events`` holds one row per log record and the position lets each record in once, so its
rows are appended without the upsert's conflict pass (a third of a batch's time); a key
that is there after all fails the batch once, and from then on every table upserts.

Besides the structured store's change events, the worker records the envelope of
every message it receives (``events``): replies carry the id of their request as
``causation_id``, and a request id is a ULID that encodes when it was made, so
response times need no copy of the requests (when requests are delivered too, their
own timestamps are used).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import duckdb
import msgspec
import structlog

import contracts.analytics as an
from contracts.envelope import Envelope
from contracts.errors import BusError, StoreError, StoreRejected, StoreUnavailable, ValidationError
from contracts.ids import id_time_ms
from contracts.inventory import InventoryItem, InventoryPage
from workers.base import Backend, Context, handles
from workers.change_events import FactChanged, FeedbackChanged, MessageChanged, read_event, timestamp

log = structlog.get_logger("membus.duckdb")

_msgpack = msgspec.msgpack.Encoder()
_decode_items = msgspec.msgpack.Decoder(list[bytes])
NS = 1_000_000_000
_DAY_NS = 86_400 * NS

TABLES: dict[str, str] = {
    "messages": """CREATE TABLE IF NOT EXISTS messages (
        message_id VARCHAR PRIMARY KEY, conversation_id VARCHAR, user_id VARCHAR, role VARCHAR,
        text VARCHAR, created_at DOUBLE, sentiment DOUBLE)""",
    "feedback": """CREATE TABLE IF NOT EXISTS feedback (
        feedback_id VARCHAR PRIMARY KEY, user_id VARCHAR, conversation_id VARCHAR, message_id VARCHAR,
        kind VARCHAR, value DOUBLE, value_text VARCHAR, created_at DOUBLE)""",
    "facts": """CREATE TABLE IF NOT EXISTS facts (
        fact_id VARCHAR PRIMARY KEY, user_id VARCHAR, text VARCHAR, fact_type VARCHAR, confidence DOUBLE,
        created_at DOUBLE, updated_at DOUBLE, version BIGINT, superseded_by VARCHAR, removed BOOLEAN,
        category VARCHAR)""",
    "events": """CREATE TABLE IF NOT EXISTS events (
        id VARCHAR PRIMARY KEY, seq BIGINT, topic VARCHAR, kind VARCHAR, ts_ns BIGINT, source VARCHAR,
        correlation_id VARCHAR, causation_id VARCHAR, request_ts_ns BIGINT)""",
    "position": "CREATE TABLE IF NOT EXISTS position (id INTEGER PRIMARY KEY, seq BIGINT NOT NULL)",
    "outbox": "CREATE TABLE IF NOT EXISTS outbox (seq BIGINT PRIMARY KEY, items BLOB NOT NULL)",
}
ADDED_COLUMNS = ("ALTER TABLE facts ADD COLUMN IF NOT EXISTS category VARCHAR",)
"""Columns a store made by earlier code lacks (appended, as the appender writes rows by position)."""
APPEND_ONLY = frozenset({"events"})
KEYS = {"messages": "message_id", "feedback": "feedback_id", "facts": "fact_id", "events": "id",
        "position": "id", "outbox": "seq"}


@dataclass
class DuckTxn:
    """Rows queued by a batch's handlers, written at the next flush (a query) or at commit."""

    con: duckdb.DuckDBPyConnection
    ops: list[tuple[str, Any, tuple[Any, ...] | None]] = field(default_factory=list)
    """(table, key, row); a row of None deletes the key. The last operation on a key wins."""
    flushed: int = 0
    """How many of ``ops`` are written already."""
    begun: bool = False
    append_only: frozenset[str] = frozenset()
    """Tables whose rows never repeat a key: written by a plain appender."""

    def put(self, table: str, row: tuple[Any, ...]) -> None:
        self.ops.append((table, row[0], row))

    def delete(self, table: str, key: Any) -> None:
        self.ops.append((table, key, None))

    def flush(self) -> None:
        if self.flushed == len(self.ops):
            return
        if not self.begun:
            self.con.execute("BEGIN")
            self.begun = True
        final: dict[str, dict[Any, tuple[Any, ...] | None]] = {}
        for table, key, row in self.ops[self.flushed:]:
            final.setdefault(table, {})[key] = row
        self.flushed = len(self.ops)
        try:
            for table, rows in final.items():
                gone = [key for key, row in rows.items() if row is None]
                if gone:
                    self.con.execute(f"DELETE FROM {table} WHERE {KEYS[table]} IN (SELECT unnest(?))", [gone])
                kept = [row for row in rows.values() if row is not None]
                if kept:
                    appender = self.con.appender(table, action="insert" if table in self.append_only else "upsert")
                    appender.append_rows(kept)
                    appender.flush()
        except duckdb.DataError as exc:  # a value a column cannot hold, e.g. an integer beyond BIGINT
            raise StoreRejected(f"{type(exc).__name__}: {exc}", store="duckdb") from exc
        except duckdb.ConstraintException as exc:
            if self.append_only:
                raise  # perhaps a row already there (DuckdbBackend.transaction): tried again upserting
            raise StoreRejected(f"{type(exc).__name__}: {exc}", store="duckdb") from exc


def _window(column: str, req: an.Window, scale: float = 1.0) -> tuple[str, list[Any]]:
    clauses, params = [], []
    if req.since is not None:
        clauses.append(f"{column} >= ?")
        params.append(req.since * scale)
    if req.until is not None:
        clauses.append(f"{column} < ?")
        params.append(req.until * scale)
    return " AND ".join(clauses), params


def _where(*parts: tuple[str, list[Any]]) -> tuple[str, list[Any]]:
    clauses = [sql for sql, _ in parts if sql]
    params = [p for _, ps in parts for p in ps]
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _equal(column: str, value: Any) -> tuple[str, list[Any]]:
    return (f"{column} = ?", [value]) if value is not None else ("", [])


def request_time_ns(env: Envelope) -> int | None:
    """When the request that ``env`` answers was made, read from its ULID; None when that is implausible."""
    cause = env.causation_id
    if len(cause) != 26:
        return None
    try:
        made = id_time_ms(cause) * 1_000_000
    except ValueError:
        return None
    return made if 0 <= env.ts - made <= _DAY_NS else None


def topic_kind(topic: str) -> str:
    return topic.rsplit(".", 1)[-1]


class DuckdbBackend(Backend):
    name = "duckdb"
    patterns: ClassVar[tuple[str, ...]] = (
        "conversation.message.changed",
        "feedback.event.changed",
        "memory.fact.changed",
        "analytics.*.request",
        "*.*.request",
        "*.*.*.request",
        "*.*.complete",
        "*.*.failed",
        "*.*.*.complete",
        "*.*.*.failed",
    )
    """Every request, reply and change: requests of other workers are observed (recorded, never answered)."""

    def __init__(self, data_dir: Path, **settings: Any) -> None:
        super().__init__(data_dir, **settings)
        self._con: duckdb.DuckDBPyConnection | None = None
        self.append_only = APPEND_ONLY

    @property
    def path(self) -> Path:
        return self.data_dir / "analytics.duckdb"

    @property
    def in_memory(self) -> bool:
        """Encrypted homes keep analytics in memory, rebuilt from the (sealed) log at every start: DuckDB's
        own encryption needs httpfs for a secure cipher (docs/security.md)."""
        return self.settings.get("encryption") is not None

    @property
    def export_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def exported_through(self) -> Path:
        """The seq of the last export written: a replayed request (an in-memory store's start) is not written again."""
        return self.data_dir / "exported-through"

    def _last_export(self) -> int:
        try:
            return int(self.exported_through.read_text())
        except (FileNotFoundError, ValueError):
            return 0

    def open(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if self.in_memory:
                con = duckdb.connect(":memory:")
                con.execute("SET temp_directory = ''")  # never spill plaintext to disk
            else:
                con = duckdb.connect(str(self.path))
            for ddl in (*TABLES.values(), *ADDED_COLUMNS):
                con.execute(ddl)
        except duckdb.Error as exc:
            raise StoreError(f"duckdb store: {exc}", store="duckdb") from exc
        self._con = con
        log.info("duckdb.opened", path=str(self.path))

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        if self._con is None:
            raise StoreError("the duckdb worker's store is not open")
        return self._con

    def rows(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Runs a query to its end (DuckDB 2.0 keeps a half-read result open on the connection)."""
        result: list[tuple[Any, ...]] = self.con.execute(sql, params or []).fetchall()
        return result

    # -- transactions ------------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[DuckTxn]:
        txn = DuckTxn(self.con, append_only=self.append_only)
        try:
            try:
                yield txn
                txn.flush()
            except BaseException:
                if txn.begun:
                    self.con.execute("ROLLBACK")
                raise
            if txn.begun:
                self.con.execute("COMMIT")
        except BusError:
            raise
        except duckdb.ConstraintException as exc:
            if not self.append_only:
                raise StoreRejected(f"{type(exc).__name__}: {exc}", store="duckdb") from exc
            log.warning("duckdb.append_conflict", error=str(exc), tables=sorted(self.append_only))
            self.append_only = frozenset()  # the batch is tried again, upserting
            raise StoreError(f"duckdb store: a key already there, the batch is tried again upserting: {exc}",
                             store="duckdb") from exc
        except duckdb.IOException as exc:  # a full disk, an I/O error: the batch is tried again
            raise StoreUnavailable(f"duckdb store: {exc}", store="duckdb") from exc
        except duckdb.Error as exc:
            raise StoreError(f"duckdb store: {type(exc).__name__}: {exc}", store="duckdb") from exc

    @contextmanager
    def savepoint(self, txn: DuckTxn) -> Iterator[None]:
        mark = len(txn.ops)
        try:
            yield
        except duckdb.Error as exc:
            if not txn.begun:
                raise
            # DuckDB aborts the whole transaction when a statement in it fails: the batch cannot commit. Refused,
            # it is applied in halves until this message is alone, with no transaction open under its question.
            raise StoreRejected(f"{type(exc).__name__}: {exc}", store="duckdb") from exc
        except BaseException:
            del txn.ops[max(mark, txn.flushed):]
            raise

    def load_position(self) -> int:
        found = self.rows("SELECT seq FROM position WHERE id = 1")
        return int(found[0][0]) if found else 0

    def save_position(self, txn: DuckTxn, seq: int) -> None:
        txn.put("position", (1, seq))

    def outbox_add(self, txn: DuckTxn, seq: int, items: list[bytes]) -> None:
        txn.put("outbox", (seq, _msgpack.encode(items)))

    def outbox_pending(self) -> list[tuple[int, list[bytes]]]:
        return [(int(seq), _decode_items.decode(items))
                for seq, items in self.rows("SELECT seq, items FROM outbox ORDER BY seq")]

    def outbox_remove(self, seqs: list[int]) -> None:
        if seqs:
            self.con.execute("DELETE FROM outbox WHERE seq IN (SELECT unnest(?))", [seqs])

    def stats(self) -> dict[str, Any]:
        if self._con is None:
            return {}
        return {table: int(self.rows(f"SELECT count(*) FROM {table}")[0][0])
                for table in ("messages", "feedback", "facts", "events")}

    # -- ingestion ---------------------------------------------------------------------------

    def record(self, txn: DuckTxn, env: Envelope, seq: int) -> None:
        kind = topic_kind(env.topic)
        started = request_time_ns(env) if kind in ("complete", "failed") else None
        txn.put("events", (env.id, seq, env.topic, kind, env.ts, env.source, env.correlation_id,
                           env.causation_id, started))

    def observes(self, topic: str) -> bool:
        return not (topic.startswith("analytics.") and topic.endswith(".request"))  # those it answers

    def observe(self, txn: DuckTxn, payload: Any, ctx: Context) -> None:
        """Records a message that has no handler of its own (requests and replies of every worker)."""
        self.record(txn, ctx.envelope, ctx.seq)

    @handles("conversation.message.changed")
    def on_message(self, txn: DuckTxn, payload: Any, ctx: Context) -> None:
        msg = read_event(payload, MessageChanged, ctx.envelope.topic)
        self.record(txn, ctx.envelope, ctx.seq)
        if msg.removed:
            txn.delete("messages", msg.message_id)
            return
        created = timestamp(msg.created_at)
        txn.put("messages", (msg.message_id, msg.conversation_id, msg.user_id, msg.role, msg.text,
                             created if created is not None else ctx.envelope.ts / NS, msg.sentiment))

    @handles("feedback.event.changed")
    def on_feedback(self, txn: DuckTxn, payload: Any, ctx: Context) -> None:
        fb = read_event(payload, FeedbackChanged, ctx.envelope.topic)
        self.record(txn, ctx.envelope, ctx.seq)
        if fb.removed:
            txn.delete("feedback", fb.feedback_id)
            return
        raw = fb.rating if fb.rating is not None else fb.value
        created = timestamp(fb.created_at)
        txn.put("feedback", (fb.feedback_id, fb.user_id, fb.conversation_id, fb.message_id, fb.kind, fb.score,
                             None if raw is None else str(raw),
                             created if created is not None else ctx.envelope.ts / NS))

    @handles("memory.fact.changed")
    def on_fact(self, txn: DuckTxn, payload: Any, ctx: Context) -> None:
        fact = read_event(payload, FactChanged, ctx.envelope.topic)
        self.record(txn, ctx.envelope, ctx.seq)
        txn.put("facts", (fact.fact_id, fact.user_id, fact.text, fact.fact_type or None,
                          fact.confidence, timestamp(fact.created_at), timestamp(fact.updated_at),
                          fact.version, fact.superseded_by, fact.removed, fact.category or None))

    # -- questions ---------------------------------------------------------------------------

    def _ask(self, txn: DuckTxn, ctx: Context) -> None:
        txn.flush()  # what earlier messages of this batch wrote is part of the answer
        self.record(txn, ctx.envelope, ctx.seq)  # queued after the flush: dropped if the question fails

    @handles("analytics.messages_per_day.request")
    def on_messages_per_day(self, txn: DuckTxn, req: an.MessagesPerDay,
                            ctx: Context) -> an.MessagesPerDayResult:
        self._ask(txn, ctx)
        where, params = _where(_window("created_at", req), _equal("user_id", req.user_id),
                               _equal("conversation_id", req.conversation_id), _equal("role", req.role))
        found = self.rows(
            "SELECT DATE '1970-01-01' + CAST(floor(created_at / 86400) AS INTEGER) AS day, count(*) "
            f"FROM messages{where} GROUP BY day ORDER BY day", params)
        return an.MessagesPerDayResult(
            days=[an.DayCount(day=day.isoformat(), messages=int(n)) for day, n in found])

    @handles("analytics.sentiment.request")
    def on_sentiment(self, txn: DuckTxn, req: an.SentimentQuery, ctx: Context) -> an.SentimentResult:
        self._ask(txn, ctx)
        where, params = _where(("sentiment IS NOT NULL", []), _window("created_at", req),
                               _equal("user_id", req.user_id), _equal("conversation_id", req.conversation_id))
        # summed in one order (a float sum depends on it): a rebuild, which ingests in another, answers the same
        average, count = self.rows(
            f"SELECT avg(sentiment ORDER BY message_id), count(*) FROM messages{where}", params)[0]
        return an.SentimentResult(average=None if average is None else float(average), messages=int(count))

    @handles("analytics.latency.request")
    def on_latency(self, txn: DuckTxn, req: an.LatencyQuery, ctx: Context) -> an.LatencyResult:
        self._ask(txn, ctx)
        p = float(req.percentile)  # checked by the contract to lie in (0, 1); DuckDB wants a constant
        where, params = _where(("c.kind IN ('complete', 'failed')", []), _window("c.ts_ns", req, NS))
        having, topic_params = _equal("request_topic", req.topic)
        found = self.rows(
            f"""WITH replies AS (
                    SELECT regexp_replace(c.topic, '\\.(complete|failed)$', '.request') AS request_topic,
                           coalesce(nullif(c.source, ''), '?') AS worker, c.kind,
                           (c.ts_ns - coalesce(r.ts_ns, c.request_ts_ns)) / 1e6 AS ms
                    FROM events c LEFT JOIN events r ON r.id = c.causation_id AND r.kind = 'request'{where})
                SELECT request_topic, worker, count(*), count(*) FILTER (WHERE kind = 'failed'),
                       quantile_cont(ms, 0.5), quantile_cont(ms, {p!r}), max(ms)
                FROM replies WHERE ms IS NOT NULL {"AND " + having if having else ""}
                GROUP BY request_topic, worker ORDER BY request_topic, worker""",
            params + topic_params)
        return an.LatencyResult(percentile=p, rows=[
            an.LatencyRow(topic=t, worker=w, replies=int(n), failed=int(f), p50_ms=float(p50),
                          percentile_ms=float(pp), max_ms=float(mx))
            for t, w, n, f, p50, pp, mx in found])

    @handles("analytics.throughput.request")
    def on_throughput(self, txn: DuckTxn, req: an.ThroughputQuery, ctx: Context) -> an.ThroughputResult:
        self._ask(txn, ctx)
        where, params = _where(_window("ts_ns", req, NS), _equal("topic", req.topic))
        found = self.rows(
            f"SELECT topic, ts_ns // {60 * NS} AS minute, count(*) FROM events{where} "
            "GROUP BY topic, minute ORDER BY minute, topic", params)
        return an.ThroughputResult(rows=[
            an.MinuteCount(topic=t, minute=_iso_minute(int(m)), messages=int(n)) for t, m, n in found])

    @handles("analytics.export.request")
    def on_export(self, txn: DuckTxn, req: an.ExportQuery, ctx: Context) -> an.ExportResult:
        self._ask(txn, ctx)
        base = self.export_dir.resolve()
        if "\x00" in req.path or any(len(part.encode()) > 255 for part in Path(req.path).parts):
            raise ValidationError(f"export path {req.path[:80]!r} is not a file name this system can make",
                                  topic=ctx.envelope.topic, field="path",
                                  expected="no NUL, and at most 255 bytes of UTF-8 between slashes")
        target = (base / req.path).resolve()
        if not target.is_relative_to(base) or target == base:
            raise ValidationError(f"export path {req.path!r} leaves the export folder",
                                  topic=ctx.envelope.topic, field="path",
                                  expected="a relative path inside the export folder")
        if ctx.seq <= self._last_export():  # written when first applied, perhaps deleted since by its user
            return an.ExportResult(path=str(target.relative_to(base)),
                                   rows=int(self.rows(f"SELECT count(*) FROM {req.table}")[0][0]))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            in_the_way = target.is_dir()  # COPY onto it would fail inside the batch's transaction
        except (FileExistsError, NotADirectoryError):  # a file where one of its folders must be
            in_the_way = True
        if in_the_way:
            raise ValidationError(f"export path {req.path!r} cannot be a file: a folder is in the way",
                                  topic=ctx.envelope.topic, field="path",
                                  expected="a file name whose folders are folders, not an existing folder")
        partial = target.with_name(f".export-{ctx.seq}.partial")  # any name may be the longest there can be
        quoted = str(partial).replace("'", "''")
        try:
            self.con.execute(f"COPY (SELECT * FROM {req.table}) TO '{quoted}' (FORMAT parquet)").fetchall()
            partial.replace(target)  # a reader never sees half a file
        finally:
            partial.unlink(missing_ok=True)
        ledger = self.exported_through.with_suffix(".tmp")
        ledger.write_text(str(ctx.seq))
        ledger.replace(self.exported_through)
        count = int(self.rows(f"SELECT count(*) FROM {req.table}")[0][0])
        return an.ExportResult(path=str(target.relative_to(base)), rows=count)

    @handles("analytics.inventory.request")
    def on_inventory(self, txn: DuckTxn, req: an.AnalyticsInventory, ctx: Context) -> InventoryPage:
        self._ask(txn, ctx)
        key, group, created = {"messages": ("message_id", "conversation_id", "created_at"),
                               "feedback": ("feedback_id", "user_id", "created_at"),
                               "facts": ("fact_id", "user_id", "created_at")}[req.kind]
        current = "NOT coalesce(removed, false)" if req.kind == "facts" else "true"
        found = self.rows(f"SELECT {key}, coalesce({group}, ''), coalesce({created}, 0), {current} "
                          f"FROM {req.kind} WHERE {key} > ? ORDER BY {key} LIMIT ?", [req.cursor, req.limit + 1])
        items = [InventoryItem(id=i, group=g, ts=float(t), current=bool(c)) for i, g, t, c in found[: req.limit]]
        return InventoryPage(kind=req.kind, items=items, cursor=items[-1].id if len(found) > req.limit else "")


def _iso_minute(minute: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(minute * 60, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
