"""The libSQL worker driven through workers.apply.apply_batch, against real database files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts.envelope import Envelope, decode_envelope, make_envelope
from contracts.errors import IntegrityError, NotFound, StoreError, ValidationError
from contracts.registry import decode_payload, encode_payload, to_builtins
from workers.apply import Outcome, apply_batch
from workers.base import Context, handles
from workers.libsql import LibsqlBackend, TransactionLost, Txn


class Driver:
    """Makes envelopes with increasing seq and applies them as the runtime would."""

    def __init__(self, backend: LibsqlBackend) -> None:
        self.backend = backend
        self.seq = backend.load_position()

    def envelope(self, topic: str, payload: Any, *, unchecked: bool = False) -> Envelope:
        """``unchecked`` skips the client-side contract check, so the worker sees whatever was sent."""
        self.seq += 1
        body = msgspec.msgpack.encode(payload) if unchecked else encode_payload(topic, payload)
        return msgspec.structs.replace(make_envelope(topic, body, reply_to="inbox.test"), seq=self.seq)

    def apply(self, *envelopes: Envelope) -> list[Outcome]:
        return apply_batch(self.backend, list(envelopes))[0]

    def request(self, topic: str, payload: Any, *, unchecked: bool = False) -> Any:
        """One request in its own batch; its reply as plain values (or the outcome when it failed)."""
        (outcome,) = self.apply(self.envelope(topic, payload, unchecked=unchecked))
        assert outcome.status in ("applied", "failed"), outcome
        return to_builtins(outcome.reply) if outcome.status == "applied" else outcome

    def count(self, table: str) -> int:
        return int(self.backend.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


class CrashingBackend(LibsqlBackend):
    """A backend with a buggy handler: it writes, then fails with an error that is not a BusError."""

    @handles("test.crash.request")
    def crash(self, txn: Txn, payload: Any, ctx: Context) -> None:
        txn.execute("INSERT INTO logs (id, timestamp, level, message) VALUES ('crash', 't', 'INFO', 'x')")
        raise RuntimeError("handler bug")

    @handles("test.lose.request")
    def lose(self, txn: Txn, payload: Any, ctx: Context) -> None:
        txn.conn.execute("ROLLBACK")  # what SQLite does by itself after some I/O errors
        raise RuntimeError("transaction gone")


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LibsqlBackend]:
    b = CrashingBackend(tmp_path / "libsql")
    b.open()
    yield b
    b.close()


@pytest.fixture
def drv(backend: LibsqlBackend) -> Driver:
    return Driver(backend)


def failed_with(outcome: Any, kind: type[Exception]) -> Any:
    assert isinstance(outcome, Outcome) and outcome.status == "failed", outcome
    assert isinstance(outcome.error, kind), outcome.error
    return outcome.error


def test_open_creates_the_file_in_wal_mode_with_foreign_keys(backend: LibsqlBackend, tmp_path: Path) -> None:
    assert backend.path == tmp_path / "libsql" / "membus.db" and backend.path.exists()
    assert backend.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert backend.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert backend.load_position() == 0
    assert "memory.store.request" in backend.patterns and "user.create.request" in backend.patterns


def test_user_round_trip(drv: Driver) -> None:
    created = drv.request("user.create.request", {"user_id": "u1", "name": "Ana", "metadata": {"lang": "pt"}})
    assert created["user_id"] == "u1" and created["created_at"].endswith("Z")

    assert drv.request("user.get.request", {"user_id": "u1"}) == created
    err = failed_with(drv.request("user.get.request", {"user_id": "nobody"}), NotFound)
    assert "nobody" in err.message
    conflict = drv.request("user.create.request", {"user_id": "u1", "name": "Someone else"})
    failed_with(conflict, IntegrityError)


def test_conversation_messages_in_order_paged_with_change_events(drv: Driver) -> None:
    conv = drv.request("conversation.start.request", {"user_id": "u1", "conversation_id": "c1", "title": "t"})
    assert conv["conversation_id"] == "c1"
    envs = [
        drv.envelope(
            "conversation.message.append.request",
            {
                "conversation_id": "c1",
                "user_id": "u1",
                "role": role,
                "text": text,
                "message_id": mid,
                "timestamp": f"2025-11-07T18:00:0{i}Z",
                **({"sentiment": 0.8} if i == 0 else {}),
            },
        )
        for i, (mid, role, text) in enumerate(
            [("m1", "user", "hello"), ("m2", "assistant", "hi there"), ("m3", "user", "how are you")]
        )
    ]
    outcomes = drv.apply(*envs)

    assert [o.status for o in outcomes] == ["applied"] * 3
    topic, event = outcomes[0].events[0]
    assert topic == "conversation.message.changed"
    assert to_builtins(event) == {
        "op": "created",
        "message_id": "m1",
        "conversation_id": "c1",
        "user_id": "u1",
        "role": "user",
        "text": "hello",
        "timestamp": "2025-11-07T18:00:00.000Z",
        "created_at": 1762538400.0,
        "sentiment": 0.8,
        "metadata": {},
    }
    page1 = drv.request("conversation.history.request", {"conversation_id": "c1", "limit": 2})
    page2 = drv.request("conversation.history.request", {"conversation_id": "c1", "limit": 2, "offset": 2})
    assert [m["message_id"] for m in page1["messages"]] == ["m1", "m2"]
    assert (page1["total"], page1["has_more"]) == (3, True)
    assert [m["text"] for m in page2["messages"]] == ["how are you"] and page2["has_more"] is False
    failed_with(drv.request("conversation.history.request", {"conversation_id": "nope"}), NotFound)


def test_history_pages_by_message_stay_right_while_messages_are_added_and_back_dated(drv: Driver) -> None:
    """Offsets shift when a message lands before the page (a back-dated one): the next page repeats one.
    Pages after / before a message of the previous page neither skip nor repeat."""
    def append(mid: str, second: int) -> None:
        drv.request("conversation.message.append.request",
                    {"conversation_id": "c1", "user_id": "u1", "role": "user", "text": mid, "message_id": mid,
                     "timestamp": f"2025-11-07T18:00:{second:02d}Z"})

    def page(**ask: Any) -> tuple[list[str], bool]:
        reply = drv.request("conversation.history.request", {"conversation_id": "c1", "limit": 2, **ask})
        return [m["message_id"] for m in reply["messages"]], reply["has_more"]

    for i in range(1, 6):
        append(f"m{i}", 10 * i)
    first, more = page()
    assert (first, more) == (["m1", "m2"], True)
    append("early", 5)  # sorts before the whole first page
    assert page(offset=2)[0] == ["m2", "m3"]  # what offsets do: m2 again
    assert page(after=first[-1]) == (["m3", "m4"], True)
    assert page(after="m4") == (["m5"], False)
    assert page(newest=True) == (["m4", "m5"], True)
    assert page(before="m4") == (["m2", "m3"], True)
    assert page(before="m2") == (["early", "m1"], False)
    assert page(after="m1", before="m4") == (["m2", "m3"], False)
    missing = drv.request("conversation.history.request", {"conversation_id": "c1", "after": "nope"})
    failed_with(missing, NotFound)
    assert missing.error.fields["field"] == "after"


def test_a_message_starts_its_conversation_when_needed(drv: Driver) -> None:
    drv.request(
        "conversation.message.append.request",
        {"conversation_id": "c9", "user_id": "u1", "role": "user", "text": "first words"},
    )
    page = drv.request("conversation.history.request", {"conversation_id": "c9"})
    assert [m["text"] for m in page["messages"]] == ["first words"]
    # a start that comes after (a module saying what the conversation is) names it, once
    start = {"user_id": "u1", "conversation_id": "c9", "title": "Hiking plans", "metadata": {"lang": "en"}}
    started = drv.request("conversation.start.request", start)
    assert (started["title"], started["metadata"]) == ("Hiking plans", {"lang": "en"})
    assert drv.request("conversation.start.request", start) == started
    failed_with(drv.request("conversation.start.request", {**start, "title": "Other"}), IntegrityError)
    failed_with(drv.request("conversation.start.request", {"user_id": "u2", "conversation_id": "c9", "title": "x"}),
                IntegrityError)


def test_facts_store_update_supersede_and_temporal_metadata(drv: Driver) -> None:
    (stored,) = drv.apply(
        drv.envelope(
            "memory.store.request",
            {
                "user_id": "u1",
                "text": "Ana lives in Lisbon",
                "fact_type": "location",
                "category": "personal",
                "confidence": 0.9,
                "metadata": {"source": "chat"},
                "fact_id": "f1",
            },
        )
    )
    fact = to_builtins(stored.reply)
    assert (fact["version"], fact["access_count"], fact["superseded_by"]) == (1, 0, None)
    assert [(t, e.op, e.fact_id) for t, e in stored.events] == [("memory.fact.changed", "created", "f1")]

    (updated,) = drv.apply(
        drv.envelope(
            "memory.fact.update.request", {"fact_id": "f1", "text": "Ana lives in Porto", "new_fact_id": "f2"}
        )
    )
    new = to_builtins(updated.reply)
    assert (new["fact_id"], new["version"], new["supersedes"], new["category"]) == ("f2", 2, "f1", "personal")
    assert new["confidence"] == 0.9 and new["metadata"] == {"source": "chat"}
    assert [(e.op, e.fact_id, e.superseded_by) for _, e in updated.events] == [
        ("created", "f2", None),
        ("superseded", "f1", "f2"),
    ]

    current = drv.request("memory.facts.request", {"user_id": "u1"})
    assert [f["fact_id"] for f in current["facts"]] == ["f2"]
    history = drv.request(
        "memory.facts.request", {"user_id": "u1", "include_superseded": True, "touch": True}
    )
    assert {f["fact_id"]: f["superseded_by"] for f in history["facts"]} == {"f1": "f2", "f2": None}
    assert all(f["access_count"] == 1 for f in history["facts"])
    again = drv.request("memory.facts.request", {"user_id": "u1", "include_superseded": True})
    assert all(f["access_count"] == 1 for f in again["facts"])  # the touch was stored

    stale = drv.request(
        "memory.store.request", {"user_id": "u1", "text": "Ana lives in Faro", "supersedes": "f1"}
    )
    failed_with(stale, IntegrityError)  # f1 is no longer current
    via_store = drv.request(
        "memory.store.request", {"user_id": "u1", "text": "Ana lives in Faro", "supersedes": "f2"}
    )
    assert via_store["version"] == 3
    assert drv.request("memory.facts.request", {"user_id": "u1", "min_confidence": 0.95})["facts"] == [
        via_store
    ]
    failed_with(drv.request("memory.fact.update.request", {"fact_id": "missing"}), NotFound)


def test_current_facts_query_uses_the_json_index(backend: LibsqlBackend) -> None:
    plan = backend.conn.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM semantic_facts WHERE user_id = ? AND "
        "json_extract(temporal_metadata, '$.superseded_by') IS NULL",
        ("u1",),
    ).fetchall()
    assert "idx_semantic_facts_current" in " ".join(str(r) for r in plan)


def test_feedback_logs_tasks_sessions_consolidation(drv: Driver) -> None:
    (fb,) = drv.apply(
        drv.envelope(
            "feedback.record.request",
            {
                "user_id": "u1",
                "message_id": "m1",
                "reward": -1,
                "reason": "too_verbose",
                "classified_categories": {"too_verbose": 0.85},
            },
        )
    )
    assert fb.status == "applied" and fb.events[0][0] == "feedback.event.changed"
    assert to_builtins(fb.reply)["classified_categories"] == {"too_verbose": 0.85}
    assert drv.count("feedback_events") == 1
    bad = drv.request("feedback.record.request", {"user_id": "u1", "free_text": "x" * 301}, unchecked=True)
    assert failed_with(bad, ValidationError).field == "free_text"

    written = drv.request("log.write.request", {"level": "INFO", "message": "hello", "module": "test"})
    row = drv.backend.conn.execute(
        "SELECT level, message, module FROM logs WHERE id = ?", (written["log_id"],)
    ).fetchone()
    assert row == ("INFO", "hello", "test")

    task = drv.request(
        "task.create.request", {"name": "consolidate", "task_id": "t1", "schedule": "0 2 * * *"}
    )
    assert task["status"] == "pending"
    done = drv.request("task.update.request", {"task_id": "t1", "status": "completed", "result": {"n": 3}})
    assert (done["status"], done["result"], done["schedule"]) == ("completed", {"n": 3}, "0 2 * * *")
    failed_with(drv.request("task.update.request", {"task_id": "nope", "status": "failed"}), NotFound)
    exploded = drv.request("task.update.request", {"task_id": "t1", "status": "exploded"}, unchecked=True)
    assert failed_with(exploded, ValidationError).field == "status"

    session = drv.request(
        "session.start.request", {"user_id": "u1", "session_id": "s1", "conversation_id": "c1"}
    )
    assert (session["status"], session["ended_at"]) == ("active", None)
    ended = drv.request("session.end.request", {"session_id": "s1", "summary": "talked"})
    assert ended["status"] == "ended" and ended["ended_at"] and ended["summary"] == "talked"
    assert drv.request("session.end.request", {"session_id": "s1"}) == ended  # ending again changes nothing

    state = {"status": "completed", "progress": {"total_users": 1}}
    drv.request("consolidation.state.save.request", {"state_id": "nightly", "state": state})
    assert drv.request("consolidation.state.get.request", {"state_id": "nightly"})["state"] == state
    failed_with(drv.request("consolidation.state.get.request", {"state_id": "other"}), NotFound)


def test_full_text_search_finds_a_message_and_a_fact(drv: Driver) -> None:
    drv.apply(
        drv.envelope(
            "conversation.message.append.request",
            {
                "conversation_id": "c1",
                "user_id": "u1",
                "role": "user",
                "text": "I ate pineapple pizza",
                "message_id": "m1",
            },
        ),
        drv.envelope(
            "conversation.message.append.request",
            {
                "conversation_id": "c1",
                "user_id": "u1",
                "role": "user",
                "text": "the weather is nice",
                "message_id": "m2",
            },
        ),
        drv.envelope(
            "memory.store.request", {"user_id": "u1", "text": "Ana is allergic to pineapple", "fact_id": "f1"}
        ),
        drv.envelope(
            "memory.store.request", {"user_id": "u2", "text": "Bo likes pineapple", "fact_id": "f9"}
        ),
    )
    found = drv.request("memory.search.text.request", {"query": "Pineapple!", "user_id": "u1"})
    assert {(h["source"], h["id"]) for h in found["hits"]} == {("messages", "m1"), ("facts", "f1")}
    assert all("[pineapple]" in h["snippet"].lower() for h in found["hits"])
    scores = [h["score"] for h in found["hits"]]
    assert scores == sorted(scores)

    both = drv.request("memory.search.text.request", {"query": "pineapple weather", "match": "any"})
    assert {h["id"] for h in both["hits"]} == {"m1", "m2", "f1", "f9"}
    assert drv.request("memory.search.text.request", {"query": "pineapple weather"})["hits"] == []
    only_facts = drv.request("memory.search.text.request", {"query": "pineapple", "sources": ["facts"]})
    assert {h["id"] for h in only_facts["hits"]} == {"f1", "f9"}
    assert drv.request("memory.search.text.request", {"query": 'NEAR(" OR *'})["hits"] == []  # no FTS syntax

    drv.request("memory.fact.update.request", {"fact_id": "f1", "text": "Ana is no longer allergic to nuts"})
    after = drv.request(
        "memory.search.text.request", {"query": "pineapple", "user_id": "u1", "sources": ["facts"]}
    )
    assert after["hits"] == []  # superseded facts are not searched


def mixed_batch(drv: Driver) -> list[Envelope]:
    return [
        drv.envelope("user.create.request", {"name": "Ana"}),
        drv.envelope(
            "conversation.message.append.request",
            {"conversation_id": "c1", "user_id": "u1", "role": "user", "text": "hello"},
        ),
        drv.envelope("memory.store.request", {"user_id": "u1", "text": "likes tea"}),
        drv.envelope("feedback.record.request", {"user_id": "u1", "reward": 1}),
        drv.envelope("log.write.request", {"level": "INFO", "message": "x"}),
        drv.envelope("task.create.request", {"name": "t"}),
        drv.envelope("session.start.request", {"user_id": "u1"}),
    ]


TABLES = (
    "users",
    "conversations",
    "messages",
    "semantic_facts",
    "feedback_events",
    "logs",
    "tasks",
    "session_metadata",
    "outbox",
)


def test_the_same_batch_twice_writes_once(drv: Driver) -> None:
    batch = mixed_batch(drv)
    first, position = apply_batch(drv.backend, batch)
    assert [o.status for o in first] == ["applied"] * len(batch) and position == batch[-1].seq
    counts = {t: drv.count(t) for t in TABLES}
    assert all(counts[t] == 1 for t in TABLES if t != "outbox") and counts["outbox"] == len(batch)

    second, position_again = apply_batch(drv.backend, batch)

    assert [o.status for o in second] == ["skipped"] * len(batch) and position_again == position
    assert {t: drv.count(t) for t in TABLES} == counts
    stats = drv.backend.stats()
    assert (stats["position"], stats["outbox"], stats["messages_stored"], stats["facts_stored"]) == (
        position,
        len(batch),
        1,
        1,
    )


def test_replaying_the_log_past_the_position_makes_no_second_row(drv: Driver) -> None:
    """Ids derive from the envelope, so even re-applying (a rebuild, a lost position) cannot double a row."""
    batch = mixed_batch(drv)
    apply_batch(drv.backend, batch)
    counts = {t: drv.count(t) for t in TABLES}

    replay, _ = apply_batch(drv.backend, batch, position=0)

    assert [o.status for o in replay] == ["applied"] * len(batch)
    assert all(not o.events for o in replay)  # nothing changed, so no change event is published again
    assert {t: drv.count(t) for t in TABLES} == counts


def test_position_and_outbox_are_committed_with_the_writes(tmp_path: Path) -> None:
    backend = LibsqlBackend(tmp_path / "libsql")
    backend.open()
    drv = Driver(backend)
    outcomes = drv.apply(
        drv.envelope(
            "conversation.message.append.request",
            {"conversation_id": "c1", "user_id": "u1", "role": "user", "text": "hi", "message_id": "m1"},
        ),
        drv.envelope("user.get.request", {"user_id": "missing"}),
    )
    assert [o.status for o in outcomes] == ["applied", "failed"]
    backend.close()

    reopened = LibsqlBackend(tmp_path / "libsql")
    reopened.open()
    try:
        assert reopened.load_position() == 2
        pending = reopened.outbox_pending()
        assert [seq for seq, _ in pending] == [1, 2]
        first = [decode_envelope(item) for item in pending[0][1]]
        assert [e.topic for e in first] == [
            "conversation.message.changed",
            "conversation.message.append.complete",
        ]
        assert first[1].recipient == "inbox.test"
        assert decode_payload(first[1].topic, first[1].payload).message_id == "m1"
        (failure,) = [decode_envelope(item) for item in pending[1][1]]
        assert failure.topic == "user.get.failed" and b"not_found" in bytes(failure.payload)

        reopened.outbox_remove([1, 2])
        assert reopened.outbox_pending() == []
    finally:
        reopened.close()


def test_an_invalid_payload_fails_naming_topic_and_field_and_writes_nothing(drv: Driver) -> None:
    (outcome,) = drv.apply(
        drv.envelope("memory.store.request", {"user_id": "u1", "text": 42}, unchecked=True)
    )

    err = failed_with(outcome, ValidationError)
    assert (err.topic, err.field) == ("memory.store.request", "text")
    assert "memory.store.request" in err.message and "text" in err.message
    assert drv.count("semantic_facts") == 0
    misspelt = {"user_id": "u1", "text": "x", "colour": "red"}
    (outcome,) = drv.apply(drv.envelope("memory.store.request", misspelt, unchecked=True))
    assert "colour" in failed_with(outcome, ValidationError).message
    bad_time = drv.request("log.write.request", {"level": "INFO", "message": "x", "timestamp": "yesterday"})
    assert failed_with(bad_time, ValidationError).field == "timestamp"
    # a time its change event could not carry would reach libSQL alone, and no other store (found by a probe)
    for when in ("1969-07-20T20:17:00Z", "3001-01-01"):
        outside = drv.request("conversation.message.append.request",
                              {"conversation_id": "c", "user_id": "u", "role": "user", "text": "x", "timestamp": when})
        assert failed_with(outside, ValidationError).field == "timestamp"
    assert drv.count("semantic_facts") == 0 and drv.count("logs") == 0 and drv.count("messages") == 0
    assert drv.backend.load_position() == drv.seq  # answered, so the log moves on


def test_a_handler_bug_is_retried_and_blocks_the_rest_of_the_batch(drv: Driver) -> None:
    outcomes = drv.apply(
        drv.envelope("user.create.request", {"user_id": "u1", "name": "Ana"}),
        drv.envelope("test.crash.request", {}),
        drv.envelope("user.create.request", {"user_id": "u2", "name": "Bo"}),
    )

    assert [o.status for o in outcomes] == ["applied", "retry", "retry"]
    assert drv.backend.load_position() == 1
    assert [r[0] for r in drv.backend.conn.execute("SELECT id FROM users").fetchall()] == ["u1"]
    assert drv.count("logs") == 0  # the crashing handler's own write was rolled back
    assert [seq for seq, _ in drv.backend.outbox_pending()] == [1]


def test_a_lost_transaction_commits_nothing(drv: Driver) -> None:
    batch = [
        drv.envelope("user.create.request", {"user_id": "u1", "name": "Ana"}),
        drv.envelope("test.lose.request", {}),
    ]
    with pytest.raises(TransactionLost):
        apply_batch(drv.backend, batch)
    assert drv.backend.load_position() == 0
    assert drv.count("users") == 0 and drv.backend.outbox_pending() == []


def test_driver_errors_are_translated_in_the_transaction(backend: LibsqlBackend) -> None:
    with pytest.raises(IntegrityError, match="UNIQUE"), backend.transaction() as txn:
        txn.execute("INSERT INTO users (id, name, created_at, updated_at) VALUES ('u', 'a', 't', 't')")
        txn.execute("INSERT INTO users (id, name, created_at, updated_at) VALUES ('u', 'b', 't', 't')")
    with pytest.raises(StoreError, match="no such table"), backend.transaction() as txn:
        txn.execute("SELECT * FROM nowhere")
    assert backend.conn.execute("SELECT count(*) FROM users").fetchone()[0] == 0
    assert not backend.conn.in_transaction


def test_a_savepoint_undoes_only_its_own_writes(backend: LibsqlBackend) -> None:
    with backend.transaction() as txn:
        txn.execute("INSERT INTO logs (id, timestamp, level, message) VALUES ('kept', 't', 'INFO', 'a')")
        with pytest.raises(RuntimeError), backend.savepoint(txn):
            txn.execute(
                "INSERT INTO logs (id, timestamp, level, message) VALUES ('undone', 't', 'INFO', 'b')"
            )
            raise RuntimeError("boom")
    assert backend.conn.execute("SELECT id FROM logs").fetchall() == [("kept",)]


def test_encryption_key_is_passed_to_libsql(tmp_path: Path) -> None:
    key = bytes(range(32))
    backend = LibsqlBackend(tmp_path / "enc", encryption_key=key)
    backend.open()
    Driver(backend).request("user.create.request", {"user_id": "u1", "name": "Ana"})
    backend.close()
    assert b"Ana" not in (tmp_path / "enc" / "membus.db").read_bytes()

    with pytest.raises(IntegrityError, match="encryption key"):
        LibsqlBackend(tmp_path / "enc").open()
    again = LibsqlBackend(tmp_path / "enc", encryption_key=key)
    again.open()
    try:
        assert Driver(again).request("user.get.request", {"user_id": "u1"})["name"] == "Ana"
    finally:
        again.close()


def test_a_write_whose_event_or_a_read_whose_reply_is_over_the_brokers_limit_fails_and_writes_nothing(
        drv: Driver, backend: LibsqlBackend) -> None:
    """A message just under the payload limit was stored, but its change event (a few fields more) was over it:
    the broker refused it from the outbox for ever, and nothing the worker published after it got through."""
    from contracts.errors import MessageTooLarge
    from workers.apply import outgoing

    backend.max_payload_bytes = 4000
    small = {"conversation_id": "c1", "user_id": "u1", "role": "user", "text": "hello"}
    assert drv.request("conversation.message.append.request", small)["message_id"]
    big = {**small, "text": "x" * 3990}  # the request fits the limit, its event does not
    (outcome,) = drv.apply(env := drv.envelope("conversation.message.append.request", big))
    err = failed_with(outcome, MessageTooLarge)
    assert err.fields["topic"] == "conversation.message.changed" and "nothing was written" in err.message
    assert drv.count("messages") == 1
    assert [len(item) for item in outgoing("libsql", env, outcome, backend.max_payload_bytes)]  # a .failed reply
    for i in range(3):
        assert drv.request("conversation.message.append.request", {**small, "text": "y" * 1500 + str(i)})
    (read,) = drv.apply(history := drv.envelope("conversation.history.request", {"conversation_id": "c1"}))
    assert read.status == "applied"  # the read itself worked; its reply is too large to publish
    [reply] = outgoing("libsql", history, read, backend.max_payload_bytes)
    assert decode_envelope(reply).topic == "conversation.history.failed"
    assert decode_payload("conversation.history.failed", decode_envelope(reply).payload)["code"] == "too_large"
