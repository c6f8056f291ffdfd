"""One module may not act as another: take its replies, answer its requests, join its groups, or keep a revoked key.

Each was found by trying it from a second module against a real broker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import lmdb
import msgspec
import pytest
import zmq

from bus.client import Bus
from bus.connection import Connection
from bus.permissions import Permissions
from contracts.envelope import encode_new
from contracts.errors import BusError, NotAuthorized, TimeoutError
from contracts.registry import encode_payload
from tests.conftest import BrokerProcess


def raw_connection(broker: BrokerProcess, public: bytes, secret: bytes, name: str,
                   inbox: str | None = None) -> Connection:
    conn = Connection(endpoint=broker.endpoint, server_key=broker.home.broker_public_key(), public_key=public,
                      secret_key=secret, name=name)
    if inbox is not None:
        conn.inbox = inbox
    conn.start()
    return conn


def refused(conn: Connection, timeout: float = 10.0) -> BusError:
    deadline = time.monotonic() + timeout
    try:
        while conn.fatal is None:
            assert time.monotonic() < deadline, "the broker did not refuse the client"
            assert not conn.connected.is_set(), "the broker let the client in"
            time.sleep(0.02)
        return conn.fatal
    finally:
        conn.close()


def test_a_module_may_not_take_another_modules_inbox(broker: BrokerProcess) -> None:
    with Bus.connect(broker.home.path, module="companion") as companion:
        victim = companion.inbox
        public, secret = broker.home.module_keys("spy")
        err = refused(raw_connection(broker, public, secret, "spy", inbox=victim))
        assert isinstance(err, NotAuthorized) and "inbox.spy." in err.message
        assert companion.status()["counters"]["inbox_refused"] == 1


def test_only_the_reply_topics_of_a_request_answer_it(broker: BrokerProcess) -> None:
    """Anyone may address an inbox; what answers a request on ``a.b.request`` is ``a.b.complete`` or ``.failed``."""
    with Bus.connect(broker.home.path, module="companion") as companion, \
            Bus.connect(broker.home.path, module="spy") as spy, \
            spy.subscribe("test.echo.request", from_seq=spy.status()["head"] + 1) as seen:
        asked = companion.request_nowait("test.echo.request", {"q": 1}, timeout=3.0)
        request = seen.get(timeout=10)

        def answer(topic: str) -> None:
            _, data = encode_new(topic, encode_payload(topic, {"a": topic}), causation_id=request.id,
                                 correlation_id=request.correlation_id, recipient=request.envelope.reply_to)
            spy.publish_raw(data).result(10)

        answer("test.forged.complete")
        with pytest.raises(TimeoutError):
            asked.result(10)
        assert companion._conn.counters.foreign_replies == 1
        again = companion.request_nowait("test.echo.request", {"q": 2}, timeout=10.0)
        request = seen.get(timeout=10)
        answer("test.echo.complete")
        assert again.result(10).topic == "test.echo.complete"


def test_a_group_belongs_to_the_module_that_made_it(broker: BrokerProcess) -> None:
    with Bus.connect(broker.home.path, module="worker-jobs") as owner, \
            Bus.connect(broker.home.path, module="guest") as guest, \
            owner.consume("jobs", ["test.job.*"]) as mine:
        owner.publish("test.job.changed", {"i": 1})
        with guest.consume("jobs", ["app.>"]) as theirs, pytest.raises(NotAuthorized):
            theirs.fetch(timeout=5)
        got = mine.fetch(timeout=10)
        assert [d.message.payload["i"] for d in got] == [1]  # patterns and deliveries untouched
        assert owner.status()["groups"]["jobs"]["patterns"] == ["test.job.*"]


def test_a_store_workers_group_is_the_workers_alone(broker: BrokerProcess) -> None:
    """A module that made the group `chroma` before that worker first ran kept the worker out of its own group."""
    with Bus.connect(broker.home.path, module="squatter") as squatter:
        with squatter.consume("chroma", ["memory.>"]) as taken, pytest.raises(NotAuthorized):
            taken.fetch(timeout=5)
        assert "chroma" not in squatter.status()["groups"]


def test_a_store_workers_group_saved_with_another_owner_is_taken_back_by_the_worker(broker: BrokerProcess) -> None:
    """A group ``chroma`` a module made before that was refused (saved by an earlier version, with its owner) is
    the chroma worker's again when the worker joins: the worker gets its deliveries, the module is kept out."""
    broker.stop()
    env = lmdb.open(str(broker.home.log_dir), max_dbs=8)
    with env.begin(write=True) as txn:
        txn.put(b"chroma", msgspec.msgpack.encode({"floor": 0, "patterns": ["app.>"], "owner": "squatter"}),
                db=env.open_db(b"groups", txn=txn))
    env.close()
    broker.start()
    with Bus.connect(broker.home.path, module="worker-chroma") as worker, \
            Bus.connect(broker.home.path, module="squatter") as squatter:
        assert worker.status()["groups"]["chroma"]["owner"] == "squatter"
        seq = squatter.publish("app.note.changed", {"i": 1})
        with worker.consume("chroma", ["app.>"], position=1) as mine:
            assert [d.seq for d in mine.fetch(timeout=10)] == [seq]
            assert worker.status()["groups"]["chroma"]["owner"] == "worker-chroma"
            with squatter.consume("chroma", ["app.>"]) as theirs, pytest.raises(NotAuthorized):
                theirs.fetch(timeout=5)


def test_a_key_removed_from_the_allow_list_no_longer_connects(broker: BrokerProcess) -> None:
    public, secret = broker.home.module_keys("temp")
    first = raw_connection(broker, public, secret, "temp")
    try:
        assert first.connected.wait(10)
    finally:
        first.close()
    (broker.home.modules / "temp.key").unlink()
    assert isinstance(refused(raw_connection(broker, public, secret, "temp")), NotAuthorized)


def test_a_revoked_module_is_cut_off_while_connected(broker: BrokerProcess) -> None:
    """CurveZMQ authenticates a connection once: a module whose key file was deleted went on publishing and
    reading until its connection ended. `membus modules revoke` now cuts it off within a second."""
    def membus(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "bus", *args, "--home", str(broker.home.path)],
                              capture_output=True, text=True, timeout=60)

    public, secret = broker.home.module_keys("revokee")
    conn = raw_connection(broker, public, secret, "revokee")
    try:
        assert conn.connected.wait(10)
        listed = membus("modules", "list", "--json")
        assert "revokee" in [m["module"] for m in json.loads(listed.stdout)], listed.stderr
        assert membus("modules", "revoke", "revokee", "--yes").returncode == 0
        deadline = time.monotonic() + 10
        while conn.fatal is None:
            assert time.monotonic() < deadline, "the revoked module was not cut off"
            time.sleep(0.05)
        assert isinstance(conn.fatal, NotAuthorized) and "revoked" in conn.fatal.message
    finally:
        conn.close()
    assert "revokee" not in [m["module"] for m in json.loads(membus("modules", "list", "--json").stdout)]
    assert membus("modules", "revoke", "revokee", "--yes").returncode == 1  # no longer there
    broker.home.module_keys("worker-lmdb")
    assert membus("modules", "revoke", "worker-lmdb", "--yes").returncode == 2  # a worker is stopped instead
    with Bus.connect(broker.home.path, module="test") as bus:
        assert bus.status()["counters"]["revoked"] >= 1


def test_with_a_permissions_file_what_it_does_not_grant_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    rules = tmp_path / "permissions.toml"
    rules.write_text('[modules.companion]\npublish = [">"]\nsubscribe = [">"]\n'
                     '[modules.plugin]\npublish = ["app.>"]\n')
    p = Permissions(rules)
    assert p.may_publish("companion", "memory.store.request") and p.may_subscribe("companion", ">")
    assert not p.may_publish("stranger", "memory.store.request") and not p.may_subscribe("stranger", "memory.>")
    assert p.may_publish("plugin", "app.x.changed") and not p.may_subscribe("plugin", ">")
    assert p.may_publish("worker-lmdb", "working.context.changed")  # workers publish their replies and events
    rules.write_text('[default]\nsubscribe = ["app.>"]\n[modules.plugin]\npublish = ["app.>"]\n')
    time.sleep(0.01)
    p = Permissions(rules)
    assert p.may_subscribe("plugin", "app.>") and not p.may_subscribe("plugin", "memory.>")
    assert not p.may_publish("stranger", "app.x.changed")


def test_with_a_permissions_file_only_workers_publish_a_stores_change_events(broker: BrokerProcess) -> None:
    """A module granted everything made Chroma index a fact and LMDB hold a message that libSQL never stored."""
    (broker.home.path / "permissions.toml").write_text('[modules.companion]\npublish = [">"]\nsubscribe = [">"]\n')
    when = "2025-06-01T12:00:00Z"
    fact = {"op": "created", "fact_id": "forged", "user_id": "u1", "text": "transfer the savings", "version": 1,
            "fact_type": "", "category": "", "confidence": 1.0, "metadata": {}, "created_at": when,
            "last_updated": when, "last_accessed": when, "access_count": 0, "superseded_by": None,
            "supersedes": None, "updated_at": when}
    with Bus.connect(broker.home.path, module="companion") as companion, \
            Bus.connect(broker.home.path, module="worker-libsql") as libsql:
        with pytest.raises(NotAuthorized):
            companion.publish("memory.fact.changed", fact)
        with pytest.raises(NotAuthorized):
            companion.publish("working.context.changed", {"session_id": "s", "action": "set", "keys": ["k"]})
        assert companion.publish("memory.store.request", {"user_id": "u1", "text": "a real request"}) > 0
        assert libsql.publish("memory.fact.changed", fact) > 0
    # a module that calls itself a worker is not one: only the names of workers that exist are trusted
    with Bus.connect(broker.home.path, module="worker-evil") as posing:
        with pytest.raises(NotAuthorized):
            posing.publish("memory.fact.changed", fact)
        with pytest.raises(NotAuthorized):
            posing.publish("memory.store.request", {"user_id": "u1", "text": "not granted"})


WHEN = "2025-06-01T12:00:00Z"
FORGED_FACT = {"fact_id": "forged", "user_id": "u1", "text": "transfer the savings", "fact_type": "", "category": "",
               "confidence": 1.0, "metadata": {}, "created_at": WHEN, "last_updated": WHEN, "last_accessed": WHEN,
               "access_count": 0, "version": 1, "superseded_by": None, "supersedes": None}


def test_with_a_permissions_file_only_workers_answer_the_requests_workers_handle(broker: BrokerProcess) -> None:
    """A module granted ``memory.>`` (to make requests) answered another module's memory.store.request, and the
    requester took the forged fact as the store's reply."""
    (broker.home.path / "permissions.toml").write_text(
        '[modules.companion]\npublish = [">"]\nsubscribe = [">"]\n'
        '[modules.mallory]\npublish = ["memory.>"]\nsubscribe = ["memory.>"]\n')
    with Bus.connect(broker.home.path, module="companion") as companion, \
            Bus.connect(broker.home.path, module="mallory") as mallory, \
            Bus.connect(broker.home.path, module="worker-libsql") as libsql, \
            mallory.subscribe("memory.store.request", from_seq=mallory.status()["head"] + 1) as seen:
        asked = companion.request_nowait("memory.store.request", {"user_id": "u1", "text": "a fact"}, timeout=20.0)
        request = seen.get(timeout=10)

        def answer(bus: Bus, topic: str, payload: object) -> int:
            _, data = encode_new(topic, encode_payload(topic, payload), causation_id=request.id,
                                 correlation_id=request.correlation_id, recipient=request.envelope.reply_to)
            return int(bus.publish_raw(data).result(10))

        with pytest.raises(NotAuthorized):
            answer(mallory, "memory.store.failed", {"code": "handler", "message": "forged"})
        with pytest.raises(NotAuthorized):
            answer(mallory, "memory.store.complete", FORGED_FACT)
        assert mallory.publish("memory.store.request", {"user_id": "u1", "text": "its own request"}) > 0
        answer(libsql, "memory.store.failed", {"code": "handler", "message": "the store's own answer"})
        assert asked.result(10).source == "worker-libsql"


def test_with_a_permissions_file_a_module_may_not_take_a_workers_next_message_ids(broker: BrokerProcess) -> None:
    """A worker's message ids follow from the log seq it answers (``derived_id``): a module granted only ``app.>``
    published those of the next seqs first, and the broker dropped the worker's reply and change event as
    duplicates (the requester timed out, Chroma and DuckDB never heard of the fact)."""
    from workers.apply import derived_id

    (broker.home.path / "permissions.toml").write_text(
        '[modules.companion]\npublish = [">"]\nsubscribe = [">"]\n[default]\npublish = ["app.>"]\n')
    with Bus.connect(broker.home.path, module="companion") as companion, \
            Bus.connect(broker.home.path, module="spy") as spy, \
            Bus.connect(broker.home.path, module="worker-libsql") as libsql, \
            libsql.subscribe("memory.store.request", from_seq=spy.status()["head"] + 1) as seen:
        target = spy.status()["head"] + 1  # the request's seq (the squat attempt is refused, so takes none)
        reply_id = derived_id("libsql", target, 1000, ordered_from=spy.ordered_ids_from)
        assert spy.ordered_ids_from == 1 and len(reply_id) == 37  # a new log: ids ordered by seq throughout
        for squat in (reply_id, derived_id("libsql", target, 1000)):  # and the hashed form of older logs
            with pytest.raises(NotAuthorized):
                spy.publish_many("app.noise", [{"i": 1}], message_ids=[squat])
        asked = companion.request_nowait("memory.store.request", {"user_id": "u1", "text": "a fact"}, timeout=20.0)
        request = seen.get(timeout=10)
        assert request.seq == target
        _, data = encode_new("memory.store.complete", encode_payload("memory.store.complete", FORGED_FACT),
                             causation_id=request.id, correlation_id=request.correlation_id,
                             recipient=request.envelope.reply_to, message_id=reply_id)
        assert libsql.publish_raw(data).result(10) > target
        assert asked.result(10).source == "worker-libsql"
        assert spy.publish("app.noise", {"i": 2}, message_id="W-not-a-worker-id") > 0


def test_no_module_connects_as_the_broker(broker: BrokerProcess) -> None:
    """A key enrolled as ``keys/modules/broker.key`` connected with the broker's own name, which skips every
    permission: it published ``security.access.denied`` audit events and, with a permissions file, anything."""
    (broker.home.path / "permissions.toml").write_text('[default]\npublish = ["app.>"]\n')
    with pytest.raises(BusError, match="reserved"):
        Bus.connect(broker.home.path, module="broker")
    public, secret = zmq.curve_keypair()
    (broker.home.modules / "broker.key").write_bytes(public)
    assert isinstance(refused(raw_connection(broker, public, secret, "broker")), NotAuthorized)
