"""The analytics worker against a real DuckDB file: bulk ingestion, answers, exactly-once, export."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pytest

import contracts.analytics  # noqa: F401 - registers the analytics topics
from contracts.envelope import Envelope, make_envelope
from contracts.errors import StoreError, StoreRejected
from contracts.ids import new_id
from contracts.registry import encode_payload
from workers.apply import apply_batch
from workers.duckdb import DuckdbBackend

DAY = 86_400.0
T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z
NS = 1_000_000_000


class Log:
    """Hands out envelopes with increasing sequence numbers, as the broker's log does."""

    def __init__(self) -> None:
        self.seq = 0

    def env(self, topic: str, payload: Any, *, reply_to: str = "", ts: int | None = None, source: str = "",
            causation_id: str = "", message_id: str | None = None, raw: bool = False) -> Envelope:
        """``raw``: encoded as is, not checked against the contract (a bad message from elsewhere)."""
        self.seq += 1
        body = msgspec.msgpack.encode(payload) if raw else encode_payload(topic, payload)
        env = make_envelope(topic, body, reply_to=reply_to,
                            causation_id=causation_id, message_id=message_id)
        env.seq = self.seq
        env.source = source
        if ts is not None:
            env.ts = ts
        return env


@pytest.fixture
def backend(tmp_path: Path) -> Any:
    b = DuckdbBackend(tmp_path / "duckdb")
    b.open()
    yield b
    b.close()


def message(i: int, created: float, sentiment: float | None, user: str = "u1") -> dict[str, Any]:
    """A `conversation.message.changed` payload as the libSQL worker's contract makes it."""
    iso = datetime.fromtimestamp(created, UTC).isoformat().replace("+00:00", "Z")
    return {"op": "created", "message_id": f"m{i}", "conversation_id": "c1", "user_id": user, "role": "user",
            "text": f"message {i}", "timestamp": iso, "created_at": created, "sentiment": sentiment}


def corpus(log: Log) -> list[Envelope]:
    msgs = [message(0, T0, 0.5), message(1, T0 + 60, -0.5), message(2, T0 + 120, None),
            message(3, T0 + DAY, 1.0), message(4, T0 + DAY + 5, 0.0, user="u2")]
    out = [log.env("conversation.message.changed", m) for m in msgs]
    iso = datetime.fromtimestamp(T0, UTC).isoformat().replace("+00:00", "Z")
    out.append(log.env("feedback.event.changed", {
        "event_id": "f1", "user_id": "u1", "event_type": "thumbs", "message_id": "m0", "skill_id": "",
        "reward": 1, "reason": "", "free_text": "", "classified_categories": {}, "metadata": {},
        "timestamp": iso, "processed": False}))
    when = "2025-06-15T10:00:00Z"
    out.append(log.env("memory.fact.changed", {
        "fact_id": "k1", "user_id": "u1", "text": "likes tea", "fact_type": "preference", "category": "preference",
        "confidence": 0.8, "metadata": {}, "created_at": when, "last_updated": when, "last_accessed": when,
        "access_count": 0, "version": 1, "superseded_by": None, "supersedes": None, "op": "created",
        "updated_at": when}))
    return out


def ask(backend: DuckdbBackend, log: Log, topic: str, payload: dict[str, Any]) -> Any:
    outcomes, _ = apply_batch(backend, [log.env(topic, payload, reply_to="inbox-1")])
    assert outcomes[0].status == "applied", outcomes[0].error
    return outcomes[0].reply


def test_ingest_and_messages_per_day(backend: DuckdbBackend) -> None:
    log = Log()
    outcomes, position = apply_batch(backend, corpus(log))
    assert [o.status for o in outcomes] == ["applied"] * 7
    assert position == 7
    assert backend.stats() == {"messages": 5, "feedback": 1, "facts": 1, "events": 7}
    reply = ask(backend, log, "analytics.messages_per_day.request", {})
    assert [(d.day, d.messages) for d in reply.days] == [("2025-06-15", 3), ("2025-06-16", 2)]
    reply = ask(backend, log, "analytics.messages_per_day.request", {"user_id": "u1"})
    assert [(d.day, d.messages) for d in reply.days] == [("2025-06-15", 3), ("2025-06-16", 1)]


def test_average_sentiment_over_a_window(backend: DuckdbBackend) -> None:
    log = Log()
    apply_batch(backend, corpus(log))
    everything = ask(backend, log, "analytics.sentiment.request", {})
    assert everything.messages == 4  # the message without a sentiment is left out
    assert everything.average == pytest.approx((0.5 - 0.5 + 1.0 + 0.0) / 4)
    first_day = ask(backend, log, "analytics.sentiment.request", {"since": T0, "until": T0 + DAY})
    assert (first_day.messages, first_day.average) == (2, pytest.approx(0.0))
    empty = ask(backend, log, "analytics.sentiment.request", {"user_id": "nobody"})
    assert (empty.messages, empty.average) == (0, None)


def test_the_average_sentiment_does_not_depend_on_the_order_the_messages_arrived_in(tmp_path: Path) -> None:
    """A rebuild ingests in another order (and batching): the average must come out the same to the last bit,
    not only to ~1e-16, or `rebuild` does not reproduce the store's answers."""
    rng = random.Random(7)
    msgs = [message(i, T0 + i, rng.uniform(-1, 1)) for i in range(20_000)]
    averages = []
    for order in (msgs, msgs[::-1], rng.sample(msgs, len(msgs))):
        b = DuckdbBackend(tmp_path / f"duckdb-{len(averages)}")
        b.open()
        try:
            log = Log()
            for start in range(0, len(order), 1500):
                apply_batch(b, [log.env("conversation.message.changed", m) for m in order[start:start + 1500]])
            averages.append(ask(b, log, "analytics.sentiment.request", {}).average)
        finally:
            b.close()
    assert averages[0] == averages[1] == averages[2]


def test_p95_latency_from_paired_request_and_complete(backend: DuckdbBackend) -> None:
    log = Log()
    base = int(T0 * NS)
    batch = []
    latencies_ms = list(range(1, 21))  # 1..20 ms
    for i, ms in enumerate(latencies_ms):
        request = log.env("memory.store.request", {"key": i}, ts=base + i * NS, raw=True)  # observed copy: no reply_to
        batch.append(request)
        batch.append(log.env("memory.store.complete", {"ok": True}, ts=request.ts + ms * 1_000_000,
                             source="lmdb", causation_id=request.id, raw=True))
    batch.append(log.env("memory.store.failed", {"code": "x"}, ts=base + 30 * NS, source="lmdb",
                         causation_id=new_id()))  # ULID made "now": far from ts, so no latency
    outcomes, _ = apply_batch(backend, batch)
    assert {o.status for o in outcomes} == {"observed"}
    reply = ask(backend, log, "analytics.latency.request", {"topic": "memory.store.request"})
    [row] = reply.rows
    assert (row.topic, row.worker, row.replies, row.failed) == ("memory.store.request", "lmdb", 20, 0)
    # quantile_cont interpolates: position 0.95 * 19 = 18.05 between 19 ms and 20 ms
    assert row.percentile_ms == pytest.approx(19.05)
    assert row.p50_ms == pytest.approx(10.5)
    assert row.max_ms == pytest.approx(20.0)


def test_latency_from_the_request_ulid_when_requests_are_not_delivered(backend: DuckdbBackend) -> None:
    log = Log()
    request_id = new_id()  # a ULID encodes its creation time in ms
    from contracts.ids import id_time_ms

    made_ns = id_time_ms(request_id) * 1_000_000
    complete = log.env("memory.search.semantic.complete", {"hits": []}, ts=made_ns + 42_000_000,
                       source="chroma", causation_id=request_id)
    apply_batch(backend, [complete])
    [row] = ask(backend, log, "analytics.latency.request", {}).rows
    assert (row.topic, row.worker) == ("memory.search.semantic.request", "chroma")
    assert row.max_ms == pytest.approx(42.0)


def test_throughput_per_topic_per_minute(backend: DuckdbBackend) -> None:
    log = Log()
    minute = int(T0 // 60 * 60) * NS
    topic = "conversation.message.changed"
    batch = [log.env(topic, message(i, T0, None), ts=minute + i * NS) for i in range(3)]
    batch.append(log.env("conversation.message.changed", message(9, T0, None), ts=minute + 61 * NS))
    apply_batch(backend, batch)
    reply = ask(backend, log, "analytics.throughput.request",
                {"topic": "conversation.message.changed", "until": T0 + 3600})
    assert [(r.minute, r.messages) for r in reply.rows] == [("2025-06-15T15:06:00Z", 3),
                                                             ("2025-06-15T15:07:00Z", 1)]


def test_redelivery_is_skipped_and_upserts_keep_one_row(backend: DuckdbBackend) -> None:
    log = Log()
    batch = corpus(log)
    apply_batch(backend, batch)
    outcomes, position = apply_batch(backend, batch)
    assert {o.status for o in outcomes} == {"skipped"}
    assert position == 7
    # even without the position (a lost position table), natural keys keep one row per message: events are
    # appended without an upsert, so the first try meets a key already there, fails whole, and the batch is
    # tried again upserting (the worker's runtime retries a StoreError)
    assert backend.append_only == {"events"}
    with pytest.raises(StoreError, match="tried again upserting"):
        apply_batch(backend, batch, position=0)
    assert backend.stats() == {"messages": 5, "feedback": 1, "facts": 1, "events": 7}
    assert backend.load_position() == 7
    assert backend.append_only == frozenset()
    apply_batch(backend, batch, position=0)
    assert backend.stats() == {"messages": 5, "feedback": 1, "facts": 1, "events": 7}


def test_a_failing_message_contributes_nothing(backend: DuckdbBackend) -> None:
    log = Log()
    good = log.env("conversation.message.changed", message(1, T0, 0.2))
    bad = log.env("conversation.message.changed", {"conversation_id": "c1", "text": "no id"}, raw=True)
    # fails after it queued its own event row (and after flushing the rows before it)
    escape = log.env("analytics.export.request", {"table": "events", "path": "../x.parquet"}, reply_to="i")
    after = log.env("conversation.message.changed", message(2, T0, 0.4))
    outcomes, position = apply_batch(backend, [good, bad, escape, after])
    assert [o.status for o in outcomes] == ["applied", "failed", "failed", "applied"]
    assert position == 4
    assert backend.stats()["messages"] == 2
    events = backend.rows("SELECT seq FROM events ORDER BY seq")
    assert events == [(1,), (4,)]  # the failed messages' rows were dropped with them


def test_position_and_outbox_survive_reopen(tmp_path: Path) -> None:
    log = Log()
    b = DuckdbBackend(tmp_path / "duckdb")
    b.open()
    apply_batch(b, corpus(log))
    apply_batch(b, [log.env("analytics.sentiment.request", {}, reply_to="inbox-1")])
    b.close()
    again = DuckdbBackend(tmp_path / "duckdb")
    again.open()
    try:
        assert again.load_position() == 8
        assert again.stats()["messages"] == 5
        pending = again.outbox_pending()
        assert [seq for seq, _ in pending] == [8]  # the reply, not yet confirmed published
        again.outbox_remove([8])
        assert again.outbox_pending() == []
    finally:
        again.close()


def test_unknown_request_is_refused_not_answered_as_complete(backend: DuckdbBackend) -> None:
    log = Log()
    outcomes, _ = apply_batch(backend, [log.env("analytics.nothing.request", {}, reply_to="inbox-1")])
    assert outcomes[0].status == "failed"
    assert outcomes[0].error is not None and outcomes[0].error.code == "unknown_topic"


def test_parquet_export_reads_back(backend: DuckdbBackend) -> None:
    log = Log()
    apply_batch(backend, corpus(log))
    reply = ask(backend, log, "analytics.export.request",
                {"table": "messages", "path": "out/messages.parquet"})
    assert reply.rows == 5
    path = backend.export_dir / reply.path
    rows = duckdb.connect().execute(
        f"SELECT message_id, sentiment FROM read_parquet('{path}') ORDER BY message_id").fetchall()
    assert rows == [("m0", 0.5), ("m1", -0.5), ("m2", None), ("m3", 1.0), ("m4", 0.0)]
    outcomes, _ = apply_batch(backend, [log.env("analytics.export.request",
                                                {"table": "messages", "path": "../../escape.parquet"},
                                                reply_to="inbox-1")])
    assert outcomes[0].status == "failed" and outcomes[0].error is not None
    assert outcomes[0].error.code == "validation"


def test_a_replayed_export_request_does_not_write_its_file_again(tmp_path: Path) -> None:
    """An in-memory store (an encrypted home) applies the whole log again at every start: an export its user had
    deleted since was written again, plaintext, at each one."""
    log = Log()
    batch = corpus(log)
    batch.append(log.env("analytics.export.request", {"table": "messages", "path": "m.parquet"}, reply_to="i"))
    first = DuckdbBackend(tmp_path / "duckdb", encryption="in memory")
    first.open()
    apply_batch(first, batch)
    first.close()
    (first.export_dir / "m.parquet").unlink()
    again = DuckdbBackend(tmp_path / "duckdb", encryption="in memory")
    again.open()
    try:
        outcomes, _ = apply_batch(again, batch)
        assert outcomes[-1].status == "applied" and outcomes[-1].reply.rows == 5
        assert not (again.export_dir / "m.parquet").exists()
        assert ask(again, log, "analytics.export.request", {"table": "messages", "path": "m.parquet"}).rows == 5
        assert (again.export_dir / "m.parquet").exists()  # a new request writes it
    finally:
        again.close()

def test_an_export_onto_a_folder_fails_alone_in_a_batch_that_already_wrote(backend: DuckdbBackend) -> None:
    """The batch's transaction is open when the export runs (it flushed the message before it): a COPY failing
    there would abort the transaction, and the batch could never commit."""
    log = Log()
    (backend.export_dir / "taken").mkdir(parents=True)
    (backend.export_dir / "file").write_text("x")
    before = log.env("conversation.message.changed", message(1, T0, 0.2))
    onto_folder = log.env("analytics.export.request", {"table": "messages", "path": "taken"}, reply_to="i")
    under_file = log.env("analytics.export.request", {"table": "messages", "path": "file/x.parquet"}, reply_to="i")
    fine = log.env("analytics.export.request", {"table": "messages", "path": "ok.parquet"}, reply_to="i")
    outcomes, position = apply_batch(backend, [before, onto_folder, under_file, fine])
    assert [o.status for o in outcomes] == ["applied", "failed", "failed", "applied"]
    assert all(o.error is not None and o.error.fields.get("field") == "path" for o in outcomes[1:3])
    assert position == 4 and backend.stats()["messages"] == 1
    assert outcomes[3].reply.rows == 1
    assert sorted(p.name for p in backend.export_dir.iterdir()) == ["file", "ok.parquet", "taken"]


def test_a_statement_failing_inside_the_batch_transaction_refuses_the_batch(backend: DuckdbBackend) -> None:
    """Whatever the failing statement, the batch is refused (the runtime then isolates the message), never left
    to fail at commit for ever."""
    log = Log()
    with pytest.raises(StoreRejected), backend.transaction() as txn:
        backend.record(txn, log.env("conversation.message.changed", message(1, T0, 0.2)), 1)
        txn.flush()
        with backend.savepoint(txn):
            backend.rows("SELECT * FROM no_such_table")
    assert backend.stats()["events"] == 0
    outcomes, _ = apply_batch(backend, [log.env("conversation.message.changed", message(2, T0, 0.2))])
    assert outcomes[0].status == "applied" and backend.stats()["messages"] == 1


def test_a_fact_keeps_its_type_and_its_category_apart_also_in_a_store_made_before_the_column(tmp_path: Path) -> None:
    """A fact with a category and no type was recorded with its category as its type."""
    folder = tmp_path / "duckdb"
    folder.mkdir()
    old = duckdb.connect(str(folder / "analytics.duckdb"))
    old.execute("""CREATE TABLE facts (
        fact_id VARCHAR PRIMARY KEY, user_id VARCHAR, text VARCHAR, fact_type VARCHAR, confidence DOUBLE,
        created_at DOUBLE, updated_at DOUBLE, version BIGINT, superseded_by VARCHAR, removed BOOLEAN)""")
    old.execute("INSERT INTO facts VALUES ('k0', 'u1', 'old', 'hobby', 1.0, 0, 0, 1, NULL, false)")
    old.close()
    backend = DuckdbBackend(folder)
    backend.open()
    try:
        log, when = Log(), "2025-06-15T10:00:00Z"
        fact = {"fact_id": "k1", "user_id": "u1", "text": "plays the cello", "fact_type": "", "category": "hobby",
                "confidence": 0.8, "metadata": {}, "created_at": when, "last_updated": when, "last_accessed": when,
                "access_count": 0,
                "version": 1, "superseded_by": None, "supersedes": None, "op": "created", "updated_at": when}
        typed = {**fact, "fact_id": "k2", "fact_type": "location", "category": ""}
        outcomes, _ = apply_batch(backend, [log.env("memory.fact.changed", f) for f in (fact, typed)])
        assert [o.status for o in outcomes] == ["applied", "applied"], [o.error for o in outcomes]
        rows = backend.con.execute("SELECT fact_id, fact_type, category FROM facts ORDER BY fact_id").fetchall()
        assert rows == [("k0", "hobby", None), ("k1", None, "hobby"), ("k2", "location", None)]
    finally:
        backend.close()
