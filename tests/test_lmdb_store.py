"""The LMDB working-memory worker, driven through workers.apply.apply_batch against a real LMDB store."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import structlog
from structlog.testing import capture_logs

import contracts.structured  # noqa: F401  (the libSQL contract of conversation.message.changed)
from bus.home import Home
from bus.keys import DerivedKey, KeyRing
from bus.logs import add_message_fields
from contracts.envelope import Envelope, decode_envelope, make_envelope
from contracts.errors import IntegrityError, StoreFull
from contracts.registry import decode_payload, encode_payload
from contracts.working import (
    APPEND,
    CONTEXT_CHANGED,
    CONTEXT_CLEAR,
    CONTEXT_GET,
    CONTEXT_SET,
    CONVERSATION_CLEAR,
    INVENTORY,
    RECENT,
)
from workers.apply import Outcome, apply_batch
from workers.base import Context
from workers.lmdb import MESSAGE_CHANGED, LmdbBackend, ValueCodec, boot_id

KiB = 1024
MiB = 1024 * KiB
T0 = time.time()


def envelope(topic: str, payload: Any, seq: int, *, ts: float | None = None) -> Envelope:
    env = make_envelope(topic, encode_payload(topic, payload), reply_to="inbox.t")
    env = msgspec.structs.replace(env, seq=seq)
    return env if ts is None else msgspec.structs.replace(env, ts=int(ts * 1e9))


def message(conversation: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"conversation_id": conversation, "user_id": "u1", "role": "user", "text": f"message {n}",
            "message_id": f"{conversation}-m{n}", "ts": T0 + n, **extra}


class Log:
    """Hands out log sequence numbers, as the broker does."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, topic: str, payload: Any, **kw: Any) -> Envelope:
        self.seq += 1
        return envelope(topic, payload, self.seq, **kw)


def open_store(path: Path, **settings: Any) -> LmdbBackend:
    store = LmdbBackend(path, **settings)
    store.open()
    return store


def sealing_ring() -> KeyRing:
    key = DerivedKey(os.urandom(32), os.urandom(8), "store:lmdb", 1)
    return KeyRing([key], key)


@pytest.fixture(params=["plain", "sealed"])
def at_rest(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The store's settings for encryption at rest: none, or a keyring (values sealed, ids blinded)."""
    return {} if request.param == "plain" else {"encryption": sealing_ring()}


@pytest.fixture
def store(tmp_path: Path, at_rest: dict[str, Any]) -> Iterator[LmdbBackend]:
    s = open_store(tmp_path / "lmdb", **at_rest)
    yield s
    s.close()


@pytest.fixture
def log() -> Log:
    return Log()


def apply(store: LmdbBackend, batch: list[Envelope]) -> list[Outcome]:
    outcomes, _ = apply_batch(store, batch)
    return outcomes


def one(store: LmdbBackend, env: Envelope) -> Outcome:
    [outcome] = apply(store, [env])
    return outcome


def texts(store: LmdbBackend, conversation: str, limit: int = 1000, now: float | None = None) -> list[str]:
    return [m.text for m in store.read_recent(conversation, limit, now=now)]


def published(store: LmdbBackend) -> list[tuple[int, Envelope, Any]]:
    return [(seq, env, decode_payload(env.topic, env.payload))
            for seq, items in store.outbox_pending() for env in map(decode_envelope, items)]


def assert_consistent(store: LmdbBackend) -> None:
    """Every message has its id entry (whose key it holds) and one expiry entry, and the per-conversation counts
    add up; in an encrypted store, every committed value is sealed (none is left a placeholder) and opens."""
    entries = store.stats()["entries"]
    assert entries["msgids"] == entries["messages"]
    assert entries["expiry"] == entries["messages"] + entries["context"] + entries["cleared"]
    with store._read() as r:
        counts = [int.from_bytes(v, "big") for _, v in r.cursor(db=store._db["convs"])]
        for key, stored in r.cursor(db=store._db["messages"]):
            msgid_end = 9 + stored[8]
            assert r.get(bytes(stored[9:msgid_end]), db=store._db["msgids"]) == bytes(key)
            if store.cfg.encryption is not None:
                assert stored[msgid_end] == 1 and len(stored) > msgid_end + 37
            store._message(bytes(key), stored)
        if store.cfg.encryption is not None:
            for key, stored in r.cursor(db=store._db["context"]):
                assert stored[8] == 1 and len(stored) > 8 + 37
                store._context_item(bytes(key), stored)
    assert sum(counts) == entries["messages"]


# -- messages ------------------------------------------------------------------------------------


def test_append_then_recent_returns_the_latest_oldest_first(store: LmdbBackend, log: Log) -> None:
    batch = [log(APPEND, message("c1", n)) for n in range(6)] + [log(APPEND, message("c2", 0))]
    outcomes = apply(store, batch)
    assert [o.status for o in outcomes] == ["applied"] * 7
    assert [o.reply.count for o in outcomes] == [1, 2, 3, 4, 5, 6, 1]

    [recent] = apply(store, [log(RECENT, {"conversation_id": "c1", "limit": 3})])
    assert recent.status == "applied"
    assert [m.text for m in recent.reply.messages] == ["message 3", "message 4", "message 5"]
    assert [m.message_id for m in recent.reply.messages] == ["c1-m3", "c1-m4", "c1-m5"]
    assert texts(store, "c1", 3) == ["message 3", "message 4", "message 5"]
    assert texts(store, "c2") == ["message 0"]
    assert texts(store, "nobody") == []
    assert_consistent(store)


def test_messages_are_ordered_by_their_time_not_by_arrival(store: LmdbBackend, log: Log) -> None:
    apply(store, [log(APPEND, message("c1", n)) for n in (5, 1, 3)])
    assert texts(store, "c1") == ["message 1", "message 3", "message 5"]


def test_a_redelivered_batch_is_skipped_and_never_duplicates(store: LmdbBackend, log: Log) -> None:
    batch = [log(APPEND, message("c1", n)) for n in range(3)]
    assert [o.status for o in apply(store, batch)] == ["applied"] * 3
    assert [o.status for o in apply(store, batch)] == ["skipped"] * 3
    assert texts(store, "c1") == ["message 0", "message 1", "message 2"]


def test_the_same_message_id_in_a_later_entry_is_held_once(store: LmdbBackend, log: Log) -> None:
    first = one(store, log(APPEND, message("c1", 1)))
    again = one(store, log(APPEND, message("c1", 1, text="resent")))
    assert (first.reply.stored, again.reply.stored) == (True, False)
    assert again.reply.count == 1
    assert texts(store, "c1") == ["message 1"]
    assert_consistent(store)


def test_an_append_without_message_id_is_keyed_by_its_envelope(store: LmdbBackend, log: Log) -> None:
    payload = {"conversation_id": "c1", "user_id": "u1", "role": "assistant", "text": "hi"}
    env = log(APPEND, payload)
    outcome = one(store, env)
    assert outcome.reply.message_id == env.id
    # The same request logged again (a client retry after a lost reply) is not stored twice.
    assert one(store, msgspec.structs.replace(env, seq=log.seq + 1)).reply.stored is False
    [held] = store.read_recent("c1")
    assert (held.role, held.ts) == ("assistant", env.ts / 1e9)


def test_each_conversation_keeps_at_most_max_messages(tmp_path: Path, log: Log, at_rest: dict[str, Any]) -> None:
    store = open_store(tmp_path / "lmdb", max_messages=5, **at_rest)
    try:
        outcomes = apply(store, [log(APPEND, message("c1", n)) for n in range(8)])
        assert outcomes[-1].reply.count == 5
        assert texts(store, "c1") == [f"message {n}" for n in range(3, 8)]
        assert_consistent(store)
    finally:
        store.close()


def rewrite_in_format(store: LmdbBackend, old: int) -> None:
    """Turns a store into what an earlier version wrote: format 2 stored a message as its expiry and the sealed
    message alone; format 1 (no format entry) also keyed an encrypted store's ``msgids`` by the keyed hash alone."""
    with store._write(expire_step=False) as txn:
        for key, stored in store._range(txn, store._db["messages"], b""):
            msg = store._message(key, stored)
            txn.put(store._db["messages"], key, stored[:8] + store.codec.encode(msg, key + stored[:8]))
            if old == 1 and store.ids.enabled:
                txn.delete(store._db["msgids"], store.ids.message(msg.message_id.encode()))
                txn.put(store._db["msgids"], store.ids.blind(msg.message_id.encode()), key)
        if old == 1:
            txn.delete(store._db["tracking"], b"format")
        else:
            txn.put(store._db["tracking"], b"format", (2).to_bytes(8, "big"))


@pytest.mark.parametrize("old", [1, 2])
def test_a_store_of_an_earlier_format_is_upgraded_at_open(tmp_path: Path, log: Log, at_rest: dict[str, Any],
                                                          old: int) -> None:
    """Messages then hold their id entry's key: evicting the oldest no longer opens it to find its id."""
    store = open_store(tmp_path / "lmdb", max_messages=5, **at_rest)
    apply(store, [log(APPEND, message("c1", n)) for n in range(4)])
    rewrite_in_format(store, old)
    store.close()
    with capture_logs() as logs:
        store = open_store(tmp_path / "lmdb", max_messages=5, **at_rest)
    try:
        assert next(e for e in logs if e["event"] == "lmdb.upgraded")["messages"] == 4
        assert_consistent(store)
        again = apply(store, [log(APPEND, message("c1", 3))] + [log(APPEND, message("c1", n)) for n in range(4, 8)])
        assert not again[0].reply.stored  # its id entry was found: an append is still idempotent
        assert texts(store, "c1") == [f"message {n}" for n in range(3, 8)]  # 0..2 evicted with their id entries
        assert_consistent(store)
        store.close()
        with capture_logs() as logs:
            store = open_store(tmp_path / "lmdb", max_messages=5, **at_rest)
        assert not [e for e in logs if e["event"] == "lmdb.upgraded"]  # once
    finally:
        store.close()


@pytest.mark.parametrize("cut", [5, 12])
def test_a_message_value_cut_short_is_an_integrity_error(store: LmdbBackend, log: Log, cut: int) -> None:
    apply(store, [log(APPEND, message("c1", 0))])
    with store._write(expire_step=False) as txn:
        [(key, stored)] = store._range(txn, store._db["messages"], b"")
        txn.put(store._db["messages"], key, stored[:cut])
    with pytest.raises(IntegrityError):
        store.read_recent("c1")
    cleared = one(store, log(CONVERSATION_CLEAR, {"conversation_id": "c1"}))  # dropping it reads its msgids key
    assert cleared.status == "failed" and isinstance(cleared.error, IntegrityError)


unsynced_commits = pytest.mark.skipif(boot_id() is None, reason="no boot id here: every commit is synced")


@unsynced_commits
def test_a_store_left_unsynced_in_another_boot_is_wiped_and_rebuilt_from_the_log(tmp_path: Path, log: Log,
                                                                                 at_rest: dict[str, Any]) -> None:
    """An OS crash or power loss while the store held commits the OS had not written: nothing in it is trusted."""
    store = open_store(tmp_path / "lmdb", **at_rest)
    apply(store, [log(APPEND, message("c1", n)) for n in range(3)])
    store.close()
    (tmp_path / "lmdb" / "unsynced").write_text("an-earlier-boot")
    with capture_logs() as logs:
        store = open_store(tmp_path / "lmdb", **at_rest)
    try:
        assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["lmdb.wiped_after_os_restart"]
        assert store.load_position() == 0  # the worker rejoins at seq 1: the log applies everything again
        assert texts(store, "c1") == []
        apply(store, [log(APPEND, message("c1", 9))])
        assert texts(store, "c1") == ["message 9"]
    finally:
        store.close()


@unsynced_commits
def test_a_store_left_unsynced_by_a_process_that_died_is_kept(tmp_path: Path) -> None:
    """kill -9 of the worker: the OS holds every commit it made, so the store is trusted as it is."""
    child = textwrap.dedent(f"""
        import os, sys
        sys.path[:0] = [{str(Path(__file__).parent.parent)!r}]
        from tests.test_lmdb_store import Log, APPEND, apply, message, open_store
        store = open_store(__import__("pathlib").Path({str(tmp_path / "lmdb")!r}))
        log = Log()
        apply(store, [log(APPEND, message("c1", n)) for n in range(3)])
        os._exit(0)  # no close: nothing synced
    """)
    subprocess.run([sys.executable, "-c", child], check=True, timeout=60)
    assert (tmp_path / "lmdb" / "unsynced").read_text() == boot_id()
    store = open_store(tmp_path / "lmdb")
    try:
        assert texts(store, "c1") == ["message 0", "message 1", "message 2"]
        assert store.load_position() == 3
    finally:
        store.close()
    assert not (tmp_path / "lmdb" / "unsynced").exists()  # a clean close flushed everything


@unsynced_commits
def test_the_unsynced_marker_lives_from_a_write_until_the_store_is_flushed(tmp_path: Path, log: Log) -> None:
    marker = tmp_path / "lmdb" / "unsynced"
    store = open_store(tmp_path / "lmdb")
    try:
        apply(store, [log(APPEND, message("c1", 0))])
        assert marker.read_text() == boot_id()
        store.idle()  # the worker had nothing to do for a while
        assert not marker.exists()
        store.expire()  # what the idle worker also does: nothing expired, nothing written
        assert not marker.exists()
        apply(store, [log(APPEND, message("c1", 1))])
        assert marker.exists()
    finally:
        store.close()
    assert not marker.exists()
    synced = open_store(tmp_path / "lmdb", sync_commits=True)
    try:
        apply(synced, [log(APPEND, message("c1", 2))])
        assert not marker.exists()  # every commit flushed: nothing to lose in an OS crash
    finally:
        synced.close()


def test_clearing_a_conversation_drops_only_its_messages(store: LmdbBackend, log: Log) -> None:
    apply(store, [log(APPEND, message(c, n)) for c in ("c1", "c2") for n in range(4)])
    outcome = one(store, log(CONVERSATION_CLEAR, {"conversation_id": "c1"}))
    assert outcome.reply.removed == 4
    assert texts(store, "c1") == []
    assert len(texts(store, "c2")) == 4
    assert_consistent(store)
    # Its message ids are free again.
    assert one(store, log(APPEND, message("c1", 0))).reply.stored is True
    # The clear is listed for `membus check` (what it dropped is not expected back) until the TTL has passed.
    listed = one(store, log(INVENTORY, {"kind": "cleared"})).reply
    assert [(i.id, i.ts > T0 - 60) for i in listed.items] == [("c1", True)]
    one(store, log(CONVERSATION_CLEAR, {"conversation_id": "c1"}))  # again: one record, its expiry renewed
    assert_consistent(store)
    assert len(one(store, log(INVENTORY, {"kind": "cleared"})).reply.items) == 1
    store.expire(now=time.time() + store.cfg.ttl_seconds + 60)
    assert one(store, log(INVENTORY, {"kind": "cleared"})).reply.items == []
    assert store.stats()["entries"]["cleared"] == 0
    assert_consistent(store)


def stored_event(message_id: str, conversation: str, text: str, **extra: Any) -> dict[str, Any]:
    """A ``conversation.message.changed`` payload as the libSQL worker publishes it."""
    return {"op": "created", "message_id": message_id, "conversation_id": conversation, "user_id": "u1",
            "role": "user", "text": text, "timestamp": "2026-01-01T00:00:00+00:00", "created_at": T0,
            "sentiment": None, "metadata": {}, **extra}


def raw_envelope(topic: str, payload: Any, seq: int) -> Envelope:
    """An envelope whose payload skips the contract check, as a peer with another version may send."""
    return msgspec.structs.replace(make_envelope(topic, msgspec.msgpack.encode(payload)), seq=seq)


def test_the_follower_path_appends_stored_messages_once(store: LmdbBackend, log: Log) -> None:
    outcome = one(store, log(MESSAGE_CHANGED, stored_event("m-42", "c1", "hello")))
    assert outcome.status == "applied"
    assert texts(store, "c1") == ["hello"]
    # The same message also sent as a direct append is still held once.
    direct = one(store, log(APPEND, {**message("c1", 0), "message_id": "m-42"}))
    assert direct.reply.stored is False
    assert texts(store, "c1") == ["hello"]


def test_the_follower_ignores_fields_it_does_not_know(store: LmdbBackend, log: Log) -> None:
    log.seq += 1
    event = stored_event("m-7", "c1", "newer peer", sequence=7, mood={"valence": 0.5})
    assert one(store, raw_envelope(MESSAGE_CHANGED, event, log.seq)).status == "applied"
    assert texts(store, "c1") == ["newer peer"]


def test_a_follower_event_missing_fields_fails_naming_the_topic(store: LmdbBackend, log: Log) -> None:
    log.seq += 1
    event = {"op": "created", "message_id": "m1", "conversation_id": "c1"}
    outcome = one(store, raw_envelope(MESSAGE_CHANGED, event, log.seq))
    assert outcome.status == "failed"
    assert outcome.error is not None and outcome.error.code == "validation"
    assert outcome.error.fields["topic"] == MESSAGE_CHANGED
    assert texts(store, "c1") == []


# -- exactly once: position and outbox ----------------------------------------------------------


def test_the_position_is_recorded_with_the_writes_and_survives_reopen(tmp_path: Path, log: Log,
                                                                    at_rest: dict[str, Any]) -> None:
    store = open_store(tmp_path / "lmdb", **at_rest)
    assert store.load_position() == 0
    _, position = apply_batch(store, [log(APPEND, message("c1", n)) for n in range(3)])
    assert position == 3
    store.close()

    store = open_store(tmp_path / "lmdb", **at_rest)
    try:
        assert store.load_position() == 3
        assert texts(store, "c1") == ["message 0", "message 1", "message 2"]
        assert [seq for seq, _ in store.outbox_pending()] == [1, 2, 3]
    finally:
        store.close()


def test_a_failed_transaction_leaves_neither_writes_nor_position(store: LmdbBackend, log: Log) -> None:
    with pytest.raises(RuntimeError), store.transaction() as txn:
        env = log(APPEND, message("c1", 0))
        store.append(txn, decode_payload(APPEND, env.payload), Context(env.seq, env, store.name))
        store.save_position(txn, env.seq)
        raise RuntimeError("crash before commit")
    assert store.load_position() == 0
    assert texts(store, "c1") == []


def test_a_savepoint_rolls_back_only_its_own_writes(store: LmdbBackend, log: Log) -> None:
    kept, dropped = log(APPEND, message("c1", 0)), log(APPEND, message("c1", 1))
    with store.transaction() as txn:
        store.append(txn, decode_payload(APPEND, kept.payload), Context(kept.seq, kept, store.name))
        with pytest.raises(RuntimeError), store.savepoint(txn):
            payload = decode_payload(APPEND, dropped.payload)
            store.append(txn, payload, Context(dropped.seq, dropped, store.name))
            raise RuntimeError("handler failed")
    assert texts(store, "c1") == ["message 0"]
    assert_consistent(store)


def test_nested_savepoints_undo_only_the_inner_writes_then_the_outer(store: LmdbBackend, log: Log) -> None:
    envs = [log(APPEND, message("c1", n)) for n in range(4)]

    def append(txn: Any, env: Envelope) -> None:
        store.append(txn, decode_payload(APPEND, env.payload), Context(env.seq, env, store.name))

    with store.transaction() as txn:
        append(txn, envs[0])
        with store.savepoint(txn):
            append(txn, envs[1])
            with pytest.raises(RuntimeError), store.savepoint(txn):
                append(txn, envs[2])
                raise RuntimeError("inner handler failed")
            assert [m.text for m in store._recent(txn.current, store._conv("c1", APPEND), 10, T0)] == [
                "message 0", "message 1"]  # the transaction reads what is left after the rollback
        with pytest.raises(RuntimeError), store.savepoint(txn):
            append(txn, envs[3])
            raise RuntimeError("outer handler failed")
        append(txn, log(APPEND, message("c1", 5)))
    assert texts(store, "c1") == ["message 0", "message 1", "message 5"]
    assert_consistent(store)


def test_a_savepoint_rolled_back_after_the_map_grew_inside_it_keeps_the_earlier_writes(
        tmp_path: Path, log: Log, at_rest: dict[str, Any]) -> None:
    store = open_store(tmp_path / "lmdb", map_size=64 * KiB, **at_rest)
    try:
        big = "x" * 2000
        with store.transaction() as txn:
            for n in range(5):
                env = log(APPEND, message("c1", n, text=f"{n} {big}"))
                store.append(txn, decode_payload(APPEND, env.payload), Context(env.seq, env, store.name))
            with pytest.raises(RuntimeError), store.savepoint(txn):
                for n in range(5, 80):
                    env = log(APPEND, message("c2", n, text=f"{n} {big}"))
                    store.append(txn, decode_payload(APPEND, env.payload), Context(env.seq, env, store.name))
                assert store.map_size > 64 * KiB
                raise RuntimeError("handler failed after the map grew")
        assert [t.split()[0] for t in texts(store, "c1")] == ["0", "1", "2", "3", "4"]
        assert texts(store, "c2") == []
        assert_consistent(store)
    finally:
        store.close()


def test_the_outbox_holds_replies_and_change_events(store: LmdbBackend, log: Log) -> None:
    set_env = log(CONTEXT_SET, {"session_id": "s1", "key": "mood", "value": "calm"})
    append_env = log(APPEND, message("c1", 0))
    apply(store, [set_env, append_env])

    out = published(store)
    assert [(seq, env.topic) for seq, env, _ in out] == [
        (1, CONTEXT_CHANGED), (1, "working.context.set.complete"), (2, "working.message.append.complete")]
    _, event, changed = out[0]
    assert (changed.session_id, changed.action, changed.keys) == ("s1", "set", ["mood"])
    assert event.causation_id == set_env.id and event.recipient == ""
    _, reply, body = out[1]
    assert reply.recipient == "inbox.t" and reply.correlation_id == set_env.correlation_id
    assert (body.session_id, body.key) == ("s1", "mood")

    store.outbox_remove([1])
    assert [seq for seq, _ in store.outbox_pending()] == [2]


def test_values_read_back_in_the_transaction_that_wrote_them(store: LmdbBackend, log: Log) -> None:
    """Encrypted values are sealed when the transaction commits; until then the transaction reads its own."""
    outcomes = apply(store, [log(APPEND, message("c1", n)) for n in range(3)]
                     + [log(RECENT, {"conversation_id": "c1", "limit": 2}),
                        log(CONTEXT_SET, {"session_id": "s1", "key": "mood", "value": "calm"}),
                        log(CONTEXT_GET, {"session_id": "s1"}),
                        log(CONTEXT_CLEAR, {"session_id": "s1", "key": "mood"}),
                        log(CONTEXT_SET, {"session_id": "s1", "key": "mood", "value": "happy"}),
                        log(CONVERSATION_CLEAR, {"conversation_id": "c1"}),
                        log(APPEND, message("c1", 9))])
    assert [m.text for m in outcomes[3].reply.messages] == ["message 1", "message 2"]
    assert outcomes[5].reply.values == {"mood": "calm"}
    assert outcomes[6].events[0][1].keys == ["mood"]
    assert outcomes[8].reply.removed == 3
    assert texts(store, "c1") == ["message 9"]
    assert store.read_context("s1") == {"mood": "happy"}
    assert_consistent(store)


def test_a_value_rewritten_in_a_savepoint_rolled_back_keeps_the_first(store: LmdbBackend, log: Log) -> None:
    first = log(CONTEXT_SET, {"session_id": "s1", "key": "mood", "value": "calm"}, ts=T0)
    second = log(CONTEXT_SET, {"session_id": "s1", "key": "mood", "value": "angry"}, ts=T0)  # same key, expiry
    with store.transaction() as txn:
        store.context_set(txn, decode_payload(CONTEXT_SET, first.payload), Context(first.seq, first, store.name))
        with pytest.raises(RuntimeError), store.savepoint(txn):
            store.context_set(txn, decode_payload(CONTEXT_SET, second.payload),
                              Context(second.seq, second, store.name))
            raise RuntimeError("handler failed")
    assert store.read_context("s1", now=T0) == {"mood": "calm"}
    assert_consistent(store)


def test_a_transactions_outbox_is_one_record_and_part_of_it_can_be_removed(store: LmdbBackend, log: Log) -> None:
    first = [log(APPEND, message("c1", n)) for n in range(3)]
    second = [log(APPEND, message("c2", n)) for n in range(2)]
    apply(store, first)
    apply(store, second)
    assert store.stats()["entries"]["outbox"] == 2
    assert [seq for seq, _ in store.outbox_pending()] == [1, 2, 3, 4, 5]
    items = dict(store.outbox_pending())

    store.outbox_remove([2, 4, 5, 99])  # a publish failed half-way through the first transaction
    assert store.outbox_pending() == [(1, items[1]), (3, items[3])]
    assert store.stats()["entries"]["outbox"] == 1
    store.outbox_remove([1, 3])
    assert store.outbox_pending() == []
    assert store.stats()["entries"]["outbox"] == 0


def test_a_savepoint_rolled_back_takes_its_outbox_entries_with_it(store: LmdbBackend, log: Log) -> None:
    with store.transaction() as txn:
        store.outbox_add(txn, 1, [b"kept"])
        with pytest.raises(RuntimeError), store.savepoint(txn):
            store.outbox_add(txn, 2, [b"dropped"])
            raise RuntimeError("handler failed")
        store.outbox_add(txn, 3, [b"also kept"])
    assert store.outbox_pending() == [(1, [b"kept"]), (3, [b"also kept"])]


def test_outbox_entries_of_one_seq_each_from_an_older_store_are_read_and_removed(
        store: LmdbBackend, log: Log) -> None:
    codec = ValueCodec(store.cfg.encryption)
    assert store.env is not None
    with store.env.begin(write=True) as txn:  # as the previous version wrote them: one record per seq
        for seq in (1, 2):
            key = seq.to_bytes(8, "big")
            txn.put(key, codec.encode([f"old {seq}".encode()], b"outbox" + key), db=store._db["outbox"])
    log.seq = 2
    apply(store, [log(APPEND, message("c1", 0))])
    assert [seq for seq, _ in store.outbox_pending()] == [1, 2, 3]
    assert store.outbox_pending()[:2] == [(1, [b"old 1"]), (2, [b"old 2"])]
    store.outbox_remove([1, 3])
    assert [seq for seq, _ in store.outbox_pending()] == [2]


# -- expiry ---------------------------------------------------------------------------------------


def test_expire_removes_exactly_the_expired_and_visits_only_them(store: LmdbBackend, log: Log) -> None:
    long_lived = [log(APPEND, message(f"c{n % 3}", n, ttl=100_000)) for n in range(300)]
    short_lived = [log(APPEND, message("short", n, ttl=1_000)) for n in range(10)]
    contexts = [log(CONTEXT_SET, {"session_id": "s1", "key": "brief", "value": 1, "ttl": 1_000}, ts=T0),
                log(CONTEXT_SET, {"session_id": "s1", "key": "lasting", "value": 2, "ttl": 100_000}, ts=T0)]
    assert {o.status for o in apply(store, long_lived + short_lived + contexts)} == {"applied"}
    later = T0 + 5_000

    # Reads already leave out what has expired, before anything is removed.
    assert texts(store, "short", now=later) == []
    assert store.read_context("s1", now=later) == {"lasting": 2}

    visited = store.stats()["expiry_visited"]
    assert store.expire(now=later) == 11
    visited = store.stats()["expiry_visited"] - visited
    assert visited == 12  # the 11 expired entries and the first one still alive, not all 312

    assert texts(store, "short") == []
    assert sum(len(texts(store, f"c{c}")) for c in range(3)) == 300
    assert store.read_context("s1") == {"lasting": 2}
    assert store.expire(now=later) == 0
    assert_consistent(store)


def test_expire_works_in_bounded_steps(store: LmdbBackend, log: Log) -> None:
    apply(store, [log(APPEND, message("c1", n, ttl=1_000)) for n in range(10)])
    later = T0 + 5_000
    assert store.expire(now=later, limit=4) == 4
    assert store.expire(now=later, limit=4) == 4
    assert store.expire(now=later, limit=4) == 2
    assert store.stats()["entries"]["messages"] == 0
    assert_consistent(store)


def test_every_batch_sweeps_some_expired_items(store: LmdbBackend, log: Log) -> None:
    # Set by a request logged long ago with a short TTL: expired by the wall clock at once.
    one(store, log(CONTEXT_SET, {"session_id": "s1", "key": "stale", "value": 1, "ttl": 10}, ts=T0 - 100))
    one(store, log(CONTEXT_SET, {"session_id": "s1", "key": "fresh", "value": 2}))
    entries = store.stats()["entries"]
    assert (entries["context"], entries["expiry"]) == (1, 1)
    assert store.read_context("s1", now=T0 - 95) == {"fresh": 2}


def test_a_message_already_expired_when_appended_is_not_stored(store: LmdbBackend, log: Log) -> None:
    outcome = one(store, log(APPEND, message("c1", 0, ts=T0 - 100, ttl=10)))
    assert (outcome.status, outcome.reply.stored, outcome.reply.count) == ("applied", False, 0)
    assert store.stats()["entries"]["messages"] == 0


def test_recent_requests_skip_expired_messages(store: LmdbBackend, log: Log) -> None:
    apply(store, [log(APPEND, message("c1", 0, ttl=1_000)), log(APPEND, message("c1", 1, ttl=100_000))])
    [outcome] = apply(store, [log(RECENT, {"conversation_id": "c1"}, ts=T0 + 5_000)])
    assert [m.text for m in outcome.reply.messages] == ["message 1"]


# -- map growth and the cap ----------------------------------------------------------------------


def test_the_map_grows_when_full_and_nothing_is_lost(tmp_path: Path, log: Log, at_rest: dict[str, Any]) -> None:
    store = open_store(tmp_path / "lmdb", map_size=64 * KiB, **at_rest)
    try:
        assert store.map_size == 64 * KiB
        text = "x" * 300
        for batch in range(10):
            envs = [log(APPEND, message(f"c{n % 7}", batch * 50 + n, text=f"{batch * 50 + n} {text}"))
                    for n in range(50)]
            assert {o.status for o in apply(store, envs)} == {"applied"}
        assert store.map_size > 64 * KiB
        assert store.stats()["map_grown"] >= 2
        held = sorted(int(t.split()[0]) for c in range(7) for t in texts(store, f"c{c}"))
        assert held == list(range(500))
        assert store.load_position() == 500
        assert len(store.outbox_pending()) == 500
        assert_consistent(store)
    finally:
        store.close()

    reopened = open_store(tmp_path / "lmdb", map_size=64 * KiB, **at_rest)
    try:
        assert sum(len(texts(reopened, f"c{c}")) for c in range(7)) == 500
        assert one(reopened, log(APPEND, message("c0", 1000))).status == "applied"
    finally:
        reopened.close()


def test_at_max_map_size_appends_fail_with_store_full_and_the_store_stays_usable(
        tmp_path: Path, log: Log, at_rest: dict[str, Any]) -> None:
    store = open_store(tmp_path / "lmdb", map_size=64 * KiB, max_map_size=2 * MiB, **at_rest)
    try:
        text = "y" * 3000
        applied = 0
        full: Outcome | None = None
        for batch in range(100):
            outcomes = apply(store, [log(APPEND, message(f"c{n % 8}", batch * 10 + n, text=text))
                                     for n in range(10)])
            applied += sum(o.status == "applied" for o in outcomes)
            failed = [o for o in outcomes if o.status != "applied"]
            if failed:
                full = failed[0]
                break
        assert full is not None, "the store never filled up"
        assert full.status == "failed"
        assert isinstance(full.error, StoreFull) and full.error.code == "store_full"
        assert store.map_size == 2 * MiB

        # The failure was answered and recorded like any other outcome.
        assert store.load_position() == log.seq
        failures = [(seq, body["code"]) for seq, env, body in published(store)
                    if env.topic == "working.message.append.failed"]
        assert failures[0] == (full.seq, "store_full")
        assert sum(len(texts(store, f"c{c}")) for c in range(8)) == applied
        assert_consistent(store)

        # Clearing frees room, and appends work again.
        cleared = one(store, log(CONVERSATION_CLEAR, {"conversation_id": "c0"}))
        assert cleared.status == "applied" and cleared.reply.removed > 0
        assert one(store, log(APPEND, message("c0", 10_000, text=text))).status == "applied"
        assert_consistent(store)
    finally:
        store.close()


# -- bad input ------------------------------------------------------------------------------------


def test_an_invalid_payload_fails_naming_the_topic_and_field(store: LmdbBackend, log: Log) -> None:
    bad = make_envelope(APPEND, msgspec.msgpack.encode({**message("c1", 0), "conversation_id": 123}),
                        reply_to="inbox.t")
    outcome = one(store, msgspec.structs.replace(bad, seq=1))
    assert outcome.status == "failed"
    assert outcome.error is not None and outcome.error.code == "validation"
    assert (outcome.error.fields["topic"], outcome.error.fields["field"]) == (APPEND, "conversation_id")
    assert store.load_position() == 1
    [(_, reply, body)] = published(store)
    assert reply.topic == "working.message.append.failed" and body["fields"]["field"] == "conversation_id"


def test_a_failure_is_logged_with_the_message_topic_seq_correlation_id_and_worker(store: LmdbBackend) -> None:
    bad = make_envelope(APPEND, msgspec.msgpack.encode({"conversation_id": 123}), reply_to="inbox.t",
                        correlation_id="corr-1")
    with capture_logs(processors=[add_message_fields]) as logs:
        one(store, msgspec.structs.replace(bad, seq=7))
        structlog.get_logger().info("after")  # logged outside any message: carries none of its fields
    [failed] = [e for e in logs if e["event"] == "message.failed"]
    assert {k: failed[k] for k in ("topic", "seq", "correlation_id", "worker")} == {
        "topic": APPEND, "seq": 7, "correlation_id": "corr-1", "worker": "lmdb"}
    [after] = [e for e in logs if e["event"] == "after"]
    assert not {"topic", "seq", "correlation_id", "worker"} & set(after)


def test_an_id_too_long_for_a_key_fails_naming_the_field_unless_keys_hold_its_hash(store: LmdbBackend,
                                                                                    log: Log) -> None:
    """Encrypted (the default), keys hold an id's 16-byte keyed hash: a 200-character id of 4-byte characters,
    which libSQL stores, was refused here, and `membus check` then failed for good."""
    long_id = "\N{GRINNING FACE}" * 200
    outcome = one(store, log(APPEND, message(long_id, 0, message_id="m-long")))
    if store.ids.enabled:
        assert outcome.status == "applied", outcome.error
        recent = one(store, log("working.recent.request", {"conversation_id": long_id}))
        assert [m.message_id for m in recent.reply.messages] == ["m-long"]
    else:
        assert outcome.status == "failed"
        assert outcome.error is not None and outcome.error.fields["field"] == "conversation_id"


def test_a_conversation_id_as_long_as_the_structured_store_takes_is_asked_for_here(store: LmdbBackend,
                                                                                    log: Log) -> None:
    """libSQL stores conversation ids up to 200 characters; working memory refused asking for one over 128."""
    long_id = "c" * 200
    assert one(store, log(APPEND, message(long_id, 0, message_id="m0"))).status == "applied"
    recent = one(store, log("working.recent.request", {"conversation_id": long_id}))
    assert recent.status == "applied" and len(recent.reply.messages) == 1


# -- session context ------------------------------------------------------------------------------


def test_context_set_get_and_clear(store: LmdbBackend, log: Log) -> None:
    value = {"topic": "travel", "scores": [1, 2.5], "nested": {"ok": True}}
    apply(store, [log(CONTEXT_SET, {"session_id": "s1", "key": "state", "value": value}),
                  log(CONTEXT_SET, {"session_id": "s1", "key": "mood", "value": "calm"}),
                  log(CONTEXT_SET, {"session_id": "s1", "key": "mood", "value": "happy"}),
                  log(CONTEXT_SET, {"session_id": "s2", "key": "mood", "value": "tired"})])
    [got] = apply(store, [log(CONTEXT_GET, {"session_id": "s1"})])
    assert got.reply.values == {"state": value, "mood": "happy"}
    assert_consistent(store)

    [one_key] = apply(store, [log(CONTEXT_CLEAR, {"session_id": "s1", "key": "mood"})])
    assert one_key.reply.removed == 1
    assert one_key.events[0][1].keys == ["mood"]
    assert store.read_context("s1") == {"state": value}

    [everything] = apply(store, [log(CONTEXT_CLEAR, {"session_id": "s1"})])
    assert (everything.reply.removed, everything.events[0][1].action) == (1, "clear")
    assert store.read_context("s1") == {}
    assert store.read_context("s2") == {"mood": "tired"}

    [nothing] = apply(store, [log(CONTEXT_CLEAR, {"session_id": "s1"})])
    assert (nothing.reply.removed, nothing.events) == (0, [])
    assert_consistent(store)


def test_a_store_is_configured_from_membus_toml_and_the_environment(tmp_path: Path) -> None:
    """Under `membus up` working memory's TTL, window and map size could not be set: only per request."""
    from tests.workers_util import System

    home = tmp_path / "home"
    home.mkdir()
    (home / "membus.toml").write_text("[stores.lmdb]\nmax_messages = 2\n")
    with System(home, worker_env={"MEMBUS_LMDB_TTL_SECONDS": "3"}) as system:
        system.worker("lmdb")
        for n in range(3):
            system.bus.request(APPEND, message("c-set", n, ts=time.time()), timeout=30)
        kept = system.bus.request(RECENT, {"conversation_id": "c-set"}, timeout=30).payload.messages
        assert [m.text for m in kept] == ["message 1", "message 2"]  # the window of 2, from membus.toml
        time.sleep(4)
        assert system.bus.request(RECENT, {"conversation_id": "c-set"}, timeout=30).payload.messages == []


def test_an_outbox_item_over_the_brokers_limit_is_dropped_not_retried_for_ever(tmp_path: Path) -> None:
    """An item written before the check (or before max_message_bytes was lowered) was refused on every retry,
    and held back everything published with it, across restarts."""
    from contracts.envelope import encode_new
    from tests.conftest import wait_until
    from tests.workers_util import System

    home = tmp_path / "home"
    env = {"MEMBUS_ENCRYPTION": "0", "MEMBUS_MAX_MESSAGE_BYTES": "4096"}
    with System(home, broker_env=env, worker_env=env) as system:
        offline = LmdbBackend(Home(home).data_dir("lmdb"))
        offline.open()
        with offline.transaction() as txn:
            offline.outbox_add(txn, 1, [encode_new("test.outbox.changed", msgspec.msgpack.encode("x" * 5000))[1],
                                        encode_new("test.outbox.changed", msgspec.msgpack.encode("fits"))[1]])
        offline.close()
        system.worker("lmdb")
        wait_until(lambda: [m.payload for m in system.bus.replay(topic="test.outbox.*")] == ["fits"],
                   timeout=30.0, what="the item that fits, published")
        system.workers["lmdb"].stop()
    reopened = LmdbBackend(Home(home).data_dir("lmdb"))
    reopened.open()
    try:
        assert reopened.outbox_pending() == []
    finally:
        reopened.close()
