"""The contract every store worker keeps, checked through the real bus: one suite, run against each worker.

Each test starts a real broker process and real ``python -m bus worker NAME`` processes in tmp_path and
stops them all, even on failure. A worker joins this suite by adding a WorkerSpec to SPECS: a write
topic whose effect the suite can find again by id, the change event that write publishes, a way to
read every effect back, and a request the worker must refuse with a ValidationError.
"""

from __future__ import annotations

import functools
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bus.client import Bus, reply_message
from bus.home import Home, Settings
from bus.protocol import DEAD_LETTER_TOPIC
from contracts import analytics, semantic, structured, working
from contracts.envelope import make_envelope
from contracts.errors import HandlerError, ValidationError
from contracts.registry import encode_payload, to_builtins
from tests.conftest import wait_until
from tests.workers_util import System, by_causation, publish_all, wait_caught_up
from workers.apply import apply_batch
from workers.registry import load

REQUEST_TIMEOUT = 60.0


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    write_topic: str
    """A request the worker answers, or an event it follows (a worker fed by other stores' changes)."""
    write: Callable[[int], Any]
    """The payload of the i-th write; its effect is found again as ``effect_id(i)``."""
    read_effects: Callable[[Bus], list[str]]
    """The ids of every write's effect in the store (read through the bus), one per stored effect."""
    invalid_topic: str
    invalid: Callable[[], Any]
    """A payload that passes no contract: built as a Struct, so the client does not check it first."""
    invalid_field: str
    changed_topic: str | None = None
    """The change event one write publishes, once (None: the worker publishes none)."""

    def __str__(self) -> str:
        return self.name

    @property
    def writes_are_requests(self) -> bool:
        return self.write_topic.endswith(".request")

    def write_through(self, bus: Bus, i: int) -> None:
        """One write, as its producer sends it: a request waits for its reply, an event for the log."""
        if self.writes_are_requests:
            bus.request(self.write_topic, self.write(i), timeout=REQUEST_TIMEOUT)
        else:
            bus.publish(self.write_topic, self.write(i))


def effect_id(i: int) -> str:
    return f"w{i}"


def _request(bus: Bus, topic: str, payload: Any) -> Any:
    return to_builtins(bus.request(topic, payload, timeout=REQUEST_TIMEOUT).payload)


def _lmdb_effects(bus: Bus) -> list[str]:
    return list(_request(bus, working.CONTEXT_GET, {"session_id": "contract"})["values"])


def _libsql_effects(bus: Bus) -> list[str]:
    texts: list[str] = []
    while True:
        page = _request(bus, "conversation.history.request",
                        {"conversation_id": "contract", "limit": 1000, "offset": len(texts)})
        texts += [m["text"] for m in page["messages"]]
        if not page["has_more"]:
            return texts


LMDB = WorkerSpec(
    name="lmdb",
    write_topic=working.CONTEXT_SET,
    write=lambda i: {"session_id": "contract", "key": effect_id(i), "value": i},
    read_effects=_lmdb_effects,
    invalid_topic=working.CONTEXT_SET,
    invalid=lambda: working.ContextSet(session_id="", key="k", value=1),
    invalid_field="session_id",
    changed_topic=working.CONTEXT_CHANGED,
)
LIBSQL = WorkerSpec(
    name="libsql",
    write_topic="conversation.message.append.request",
    write=lambda i: {"conversation_id": "contract", "user_id": "u1", "role": "user", "text": effect_id(i)},
    read_effects=_libsql_effects,
    invalid_topic="conversation.message.append.request",
    invalid=lambda: structured.MessageAppend(conversation_id="contract", user_id="u1", role="user", text=""),
    invalid_field="text",
    changed_topic="conversation.message.changed",
)


def _inventory(topic: str, kind: str) -> Callable[[Bus], list[str]]:
    def read(bus: Bus) -> list[str]:
        ids: list[str] = []
        cursor = ""
        while True:
            page = _request(bus, topic, {"kind": kind, "cursor": cursor})
            ids += [item[0] if isinstance(item, list) else item["id"] for item in page["items"]]
            cursor = page["cursor"]
            if not cursor:
                return [i for i in ids if i.startswith("w")]
    return read


def _message_changed(i: int) -> dict[str, Any]:
    """A message as the libSQL worker announces it; the analytics worker follows these."""
    return {"op": "created", "message_id": effect_id(i), "conversation_id": "contract", "user_id": "u1",
            "role": "user", "text": f"message {i}", "timestamp": "2026-01-01T00:00:00Z",
            "created_at": 1767225600.0 + i, "sentiment": 0.5}


CHROMA = WorkerSpec(
    name="chroma",
    write_topic="semantic.index.request",
    write=lambda i: {"id": effect_id(i), "text": f"the user mentioned topic number {i}", "user_id": "u1"},
    read_effects=_inventory("semantic.inventory.request", "memory"),
    invalid_topic="semantic.index.request",
    invalid=lambda: semantic.IndexText(id="", text="x"),
    invalid_field="id",
)
DUCKDB = WorkerSpec(
    name="duckdb",
    write_topic="conversation.message.changed",
    write=_message_changed,
    read_effects=_inventory("analytics.inventory.request", "messages"),
    invalid_topic="analytics.inventory.request",
    invalid=lambda: analytics.AnalyticsInventory(kind="messages", limit=0),
    invalid_field="limit",
)
SPECS = [LMDB, LIBSQL, CHROMA, DUCKDB]


@functools.cache
def import_error(name: str) -> str | None:
    try:
        load(name)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(params=SPECS, ids=str)
def spec(request: pytest.FixtureRequest) -> WorkerSpec:
    s: WorkerSpec = request.param
    error = import_error(s.name)
    if error:
        pytest.skip(f"worker {s.name!r} cannot be imported: {error}")
    return s


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    with System(tmp_path / "home") as s:
        yield s


def assert_each_write_once(spec: WorkerSpec, bus: Bus, n: int) -> None:
    effects = Counter(spec.read_effects(bus))
    assert effects == Counter({effect_id(i): 1 for i in range(n)}), "a write is missing or stored twice"


def assert_one_change_event_per_write(spec: WorkerSpec, bus: Bus) -> None:
    if spec.changed_topic is None:
        return
    write_ids = {m.id for m in bus.replay(topic=spec.write_topic)}
    events = by_causation(list(bus.replay(topic=spec.changed_topic)))
    assert events == dict.fromkeys(write_ids, 1), "a change event is missing, doubled, or has no write"


# -- the store applies each logged message exactly once ------------------------------------------------------


def test_a_redelivery_inside_one_batch_is_skipped(spec: WorkerSpec, tmp_path: Path) -> None:
    """After an ack timeout the broker can redeliver a message that still sits in the worker's next batch."""
    backend = load(spec.name)(tmp_path / spec.name)
    backend.open()
    try:
        first, second = (make_envelope(spec.write_topic, encode_payload(spec.write_topic, spec.write(i)))
                         for i in range(2))
        first.seq, second.seq = 7, 8
        outcomes, position = apply_batch(backend, [first, second, first], position=0)
        assert [o.status for o in outcomes] == ["applied", "applied", "skipped"]
        assert position == backend.load_position() == 8
        assert [seq for seq, _ in backend.outbox_pending()] == ([7, 8] if spec.changed_topic else [])
    finally:
        backend.close()


def test_messages_redelivered_after_an_ack_timeout_are_applied_once(spec: WorkerSpec, tmp_path: Path) -> None:
    # With an ack timeout of a millisecond, whatever the worker holds at each broker tick is redelivered,
    # while the first delivery still waits in the worker's queue or is being applied.
    broker_env = {"MEMBUS_ACK_TIMEOUT_S": "0.001", "MEMBUS_MAX_ATTEMPTS": "100000"}
    worker_env = {"MEMBUS_WORKER_BATCH_SIZE": "50", "MEMBUS_WORKER_ACK_TIMEOUT_S": "0.001"}
    with System(tmp_path / "home", broker_env=broker_env, worker_env=worker_env) as system:
        bus = system.bus
        n = 2000
        publish_all(bus, spec.write_topic, [spec.write(i) for i in range(n)])
        worker = system.worker(spec.name)
        wait_caught_up(bus, spec.name)
        st = worker.fresh_status()
        # The broker redelivers on its tick (every 100 ms); a fast worker can apply a burst between two
        # ticks, so send more bursts (a few at most) until one was redelivered.
        while st["skipped"] == 0 and n < 10_000:
            publish_all(bus, spec.write_topic, [spec.write(i) for i in range(n, n + 2000)])
            n += 2000
            wait_caught_up(bus, spec.name)
            st = worker.fresh_status()
        assert st["skipped"] > 0, "the broker redelivered nothing: the test did not exercise redelivery"
        assert st["applied"] == n, f"{st['applied']} applications for {n} writes"
        assert_each_write_once(spec, bus, n)
        assert_one_change_event_per_write(spec, bus)


def test_a_slow_store_joins_its_group_with_its_own_ack_timeout(system: System) -> None:
    if import_error("chroma"):
        pytest.skip(f"worker 'chroma' cannot be imported: {import_error('chroma')}")
    system.worker("chroma")
    system.worker("lmdb")
    wait_until(lambda: {"chroma", "lmdb"} <= set(system.bus.status()["groups"]), timeout=30)
    groups = system.bus.status()["groups"]
    assert groups["chroma"]["ack_timeout_s"] == load("chroma").ack_timeout_s > Settings().ack_timeout_s
    assert groups["lmdb"]["ack_timeout_s"] == Settings().ack_timeout_s


def test_kill_9_mid_batch_resumes_with_nothing_lost_or_doubled(spec: WorkerSpec, system: System) -> None:
    bus = system.bus
    worker = system.worker(spec.name)
    n, rounds, interrupted = 0, 0, False
    # Kill the worker as soon as it has acknowledged part of a burst; a fast machine may finish the burst
    # before the kill lands, so go again (a few times at most) until one kill interrupts a burst.
    while not interrupted and rounds < 4:
        burst = 3000
        pendings = [bus.publish_nowait(spec.write_topic, spec.write(n + i), timeout=60) for i in range(burst)]
        first = pendings[0].result(65)
        wait_until(lambda first=first: bus.status()["groups"][spec.name]["acked"] >= first, timeout=REQUEST_TIMEOUT,
                   interval=0.005, what="the worker has applied part of the burst")
        worker.kill()
        last = max(p.result(65) for p in pendings)
        interrupted = bus.status()["groups"][spec.name]["acked"] < last
        n += burst
        rounds += 1
        worker.start()
        wait_caught_up(bus, spec.name, timeout=120)
    assert interrupted, "every kill landed after the burst was applied"
    assert_each_write_once(spec, bus, n)
    assert_one_change_event_per_write(spec, bus)


def test_change_events_are_published_once_per_committed_change(spec: WorkerSpec, system: System) -> None:
    if spec.changed_topic is None or not spec.writes_are_requests:
        pytest.skip(f"worker {spec.name!r} publishes no change events for requests")
    bus = system.bus
    system.worker(spec.name)
    n = 60
    writes = [bus.request_nowait(spec.write_topic, spec.write(i), timeout=REQUEST_TIMEOUT) for i in range(n)]
    refused = bus.request_nowait(spec.invalid_topic, spec.invalid(), timeout=REQUEST_TIMEOUT)
    write_ids = {reply_message(p.result(REQUEST_TIMEOUT)).causation_id for p in writes}
    with pytest.raises(ValidationError):
        reply_message(refused.result(REQUEST_TIMEOUT))
    assert_each_write_once(spec, bus, n)  # a read: it changes nothing
    wait_caught_up(bus, spec.name)
    events = by_causation(list(bus.replay(topic=spec.changed_topic)))
    assert events == dict.fromkeys(write_ids, 1)
    replies = by_causation(list(bus.replay(topic=spec.write_topic.removesuffix(".request") + ".*")))
    assert all(replies[i] == 1 for i in write_ids), "a request was answered twice"


# -- what a worker refuses, and what it gives up on ----------------------------------------------------------


def test_an_invalid_payload_is_answered_failed_once_and_the_worker_goes_on(spec: WorkerSpec,
                                                                            system: System) -> None:
    bus = system.bus
    worker = system.worker(spec.name)
    with pytest.raises(ValidationError) as info:
        bus.request(spec.invalid_topic, spec.invalid(), timeout=REQUEST_TIMEOUT, correlation_id="invalid-1")
    assert (info.value.topic, info.value.field) == (spec.invalid_topic, spec.invalid_field)
    assert spec.invalid_field in info.value.message
    spec.write_through(bus, 0)
    assert_each_write_once(spec, bus, 1)
    wait_caught_up(bus, spec.name)
    failed = spec.invalid_topic.removesuffix(".request") + ".failed"
    assert [m.topic for m in bus.replay(correlation_id="invalid-1")] == [spec.invalid_topic, failed]
    st = worker.fresh_status()
    assert (st["failed"], st["retried"], st["dead_lettered"]) == (1, 0, 0)
    assert bus.status()["groups"][spec.name]["dead_letters"] == 0


POISON_ENV = {"MEMBUS_EXTRA_BACKENDS": "poison=tests.poison_backend:PoisonBackend",
              "MEMBUS_WORKER_MAX_ATTEMPTS": "3", "MEMBUS_WORKER_RETRY_BACKOFF_S": "0.01"}


def test_a_message_whose_handler_keeps_raising_is_dead_lettered_once(tmp_path: Path) -> None:
    from tests.poison_backend import TOPIC

    with System(tmp_path / "home", broker_env=POISON_ENV, worker_env=POISON_ENV) as system:
        bus = system.bus
        worker = system.worker("poison")
        assert bus.request(TOPIC, {"n": 1}, timeout=REQUEST_TIMEOUT).payload["n"] == 1
        poisoned = bus.request_nowait(TOPIC, {"n": 2, "poison": True}, timeout=REQUEST_TIMEOUT,
                                      correlation_id="poison-2")
        after = bus.request_nowait(TOPIC, {"n": 3}, timeout=REQUEST_TIMEOUT)
        with pytest.raises(HandlerError) as info:
            reply_message(poisoned.result(REQUEST_TIMEOUT))
        assert info.value.code == "handler" and "RuntimeError: poisoned message 2" in info.value.message
        assert reply_message(after.result(REQUEST_TIMEOUT)).payload["n"] == 3
        wait_caught_up(bus, "poison")
        (request, *_) = bus.replay(correlation_id="poison-2")
        dead = [m for m in bus.replay(topic=DEAD_LETTER_TOPIC)]
        assert len(dead) == 1
        assert dead[0].causation_id == request.id
        assert dead[0].payload == {"group": "poison", "seq": request.seq, "topic": TOPIC, "message_id": request.id,
                                   "attempts": 3, "reason": "RuntimeError: poisoned message 2"}
        assert [m.topic for m in bus.replay(correlation_id="poison-2")] == [
            TOPIC, DEAD_LETTER_TOPIC, "test.poison.failed"]
        st = worker.fresh_status()
        assert (st["applied"], st["dead_lettered"], st["retried"]) == (2, 1, 2)
        assert bus.status()["groups"]["poison"]["dead_letters"] == 0  # the worker gave up, not the broker


def test_a_message_that_kills_its_worker_is_isolated_then_dead_lettered_and_the_rest_applied(
        tmp_path: Path) -> None:
    """A message whose handling ends the process (SIGKILL here: a native crash or an out-of-memory kill) must not
    stop its store for good: after a death the batch is applied in chunks of 16, the chunk that ends a process
    again one message per transaction, and a message that alone ends ``max_attempts`` processes is answered
    ``.failed`` and dead-lettered without running again."""
    from tests.poison_backend import TOPIC

    with System(tmp_path / "home", broker_env=POISON_ENV, worker_env=POISON_ENV) as system:
        bus = system.bus
        pending = [bus.request_nowait(TOPIC, {"n": i, "crash": i == 30}, timeout=REQUEST_TIMEOUT,
                                      correlation_id=f"c{i}") for i in range(40)]
        worker = system.worker("poison", wait=False)
        deaths = 0
        deadline = time.monotonic() + 120
        while not all(p.done for p in pending):
            assert time.monotonic() < deadline, f"{deaths} deaths, requests still unanswered"
            assert worker.proc is not None
            if worker.proc.poll() is not None:
                deaths += 1
                assert deaths <= 6, "the worker keeps dying on the same message"
                worker.start(wait=False)
            time.sleep(0.05)
        # once in the first batch, once in its chunk of 16 if that batch was bigger, then 3 times (max_attempts) alone
        assert 4 <= deaths <= 5
        for i, p in enumerate(pending):
            if i == 30:
                with pytest.raises(HandlerError) as info:
                    reply_message(p.result(1))
                assert "ended 3 times" in info.value.message
            else:
                assert reply_message(p.result(1)).payload["n"] == i
        wait_caught_up(bus, "poison")
        (request, *_) = bus.replay(correlation_id="c30")
        dead = [m.payload for m in bus.replay(topic=DEAD_LETTER_TOPIC)]
        assert [(d["seq"], d["attempts"]) for d in dead] == [(request.seq, 3)]
        for i in (0, 16, 29, 31, 39):  # applied once each, whatever batch or death they were in
            assert [m.topic for m in bus.replay(correlation_id=f"c{i}")] == [
                TOPIC, "working.context.changed", "test.poison.complete"]
        assert worker.proc is not None and worker.proc.poll() is None
        assert worker.fresh_status()["suspects"] == ""  # past the suspects: batches as usual again


def _fact_changed(i: int, version: int = 1) -> dict[str, Any]:
    """A fact as the libSQL worker announces it; the analytics worker follows these."""
    when = "2026-01-01T00:00:00Z"
    return {"op": "created", "fact_id": effect_id(i), "user_id": "u1", "text": f"fact {i}", "fact_type": "personal",
            "category": "general", "confidence": 0.9, "metadata": {}, "created_at": when, "last_updated": when,
            "last_accessed": when, "access_count": 0, "version": version, "superseded_by": None,
            "supersedes": None, "updated_at": when}


def test_a_message_its_store_refuses_at_commit_is_dead_lettered_alone_and_the_rest_of_its_batch_applied(
        system: System) -> None:
    """DuckDB refuses a fact version beyond BIGINT only when the batch's rows are written, at commit: nothing
    tells which message of the batch it was. The worker applies the batch in halves until that message is alone,
    answers it with the store's refusal and dead-letters it, and applies the others once each."""
    bus = system.bus
    seqs = publish_all(bus, "memory.fact.changed", [_fact_changed(i, 2**63 if i == 7 else 1) for i in range(12)])
    worker = system.worker(DUCKDB.name)  # after the publishes: the twelve facts come in one batch
    wait_caught_up(bus, DUCKDB.name)
    facts = _inventory("analytics.inventory.request", "facts")
    assert Counter(facts(bus)) == Counter(effect_id(i) for i in range(12) if i != 7)
    dead = [m.payload for m in bus.replay(topic=DEAD_LETTER_TOPIC)]
    assert [(d["group"], d["seq"], d["topic"]) for d in dead] == [(DUCKDB.name, seqs[7], "memory.fact.changed")]
    assert "duckdb store refused" in dead[0]["reason"] and "INT64" in dead[0]["reason"]
    status = worker.fresh_status()
    assert (status["failed"], status["dead_lettered"], status["stalled"]) == (1, 1, "")
    publish_all(bus, "memory.fact.changed", [_fact_changed(12)])  # and it goes on
    wait_caught_up(bus, DUCKDB.name)
    assert effect_id(12) in facts(bus)


def test_a_range_marked_by_a_process_that_ended_after_its_commit_is_not_suspected(tmp_path: Path) -> None:
    """The process can end between a transaction's commit and the marker's clearing: the next run finds the
    range already applied, so it suspects nothing and applies in batches."""
    with System(tmp_path / "home") as system:
        bus = system.bus
        publish_all(bus, LMDB.write_topic, [LMDB.write(i) for i in range(10)])
        worker = system.worker("lmdb")
        wait_caught_up(bus, "lmdb")
        position = worker.fresh_status()["position"]
        assert worker.stop() == 0
        marker = tmp_path / "home" / "data" / "lmdb.applying"
        marker.write_bytes(f"1 {position} 0 10".encode().ljust(64))
        system.worker("lmdb")
        publish_all(bus, LMDB.write_topic, [LMDB.write(i) for i in range(10, 60)])
        wait_caught_up(bus, "lmdb")
        st = worker.fresh_status()
        assert st["suspects"] == "" and st["applied"] == 50 and st["batches"] < 50


# -- a worker that is down ------------------------------------------------------------------------------------


def test_while_a_worker_is_down_the_bus_and_other_stores_work_and_it_catches_up(spec: WorkerSpec,
                                                                                system: System) -> None:
    others = [s for s in SPECS if s.name != spec.name and not import_error(s.name)]
    if not others:
        pytest.skip("needs a second worker")
    other = others[0]
    bus = system.bus
    worker = system.worker(spec.name)
    system.worker(other.name)
    spec.write_through(bus, 0)
    assert worker.stop() == 0, worker.log_tail()
    wait_until(lambda: bus.status()["groups"][spec.name]["members"] == 0, what="worker left its group")
    n = 300
    publish_all(bus, spec.write_topic, [spec.write(i) for i in range(1, n)])
    for i in range(5):
        other.write_through(bus, i)
    assert_each_write_once(other, bus, 5)
    assert bus.status()["groups"][spec.name]["lag"] >= n - 1
    system.worker(spec.name)
    wait_caught_up(bus, spec.name)
    assert_each_write_once(spec, bus, n)
    assert_one_change_event_per_write(spec, bus)


def test_a_store_that_lost_its_last_commits_catches_up_from_the_log_with_nothing_doubled(
        spec: WorkerSpec, system: System, tmp_path: Path) -> None:
    """What an OS crash can do to a store that does not sync every commit (LMDB with metasync off, SQLite
    with synchronous=NORMAL): its newest transactions are gone, position included. The log still has them."""
    bus = system.bus
    worker = system.worker(spec.name)
    n = 150
    publish_all(bus, spec.write_topic, [spec.write(i) for i in range(n)])
    wait_caught_up(bus, spec.name)
    assert worker.stop() == 0, worker.log_tail()
    store = Home(system.home).data_dir(spec.name)
    shutil.copytree(store, tmp_path / "before")
    worker = system.worker(spec.name)
    publish_all(bus, spec.write_topic, [spec.write(i) for i in range(n, 2 * n)])
    wait_caught_up(bus, spec.name)
    assert worker.stop() == 0, worker.log_tail()
    shutil.rmtree(store)
    shutil.copytree(tmp_path / "before", store)
    worker = system.worker(spec.name)
    wait_caught_up(bus, spec.name)
    assert_each_write_once(spec, bus, 2 * n)
    assert_one_change_event_per_write(spec, bus)
    assert worker.fresh_status()["applied"] >= n, "the lost commits were not applied again"


def test_a_killed_worker_still_listed_as_member_makes_nothing_dead_letter(system: System) -> None:
    bus = system.bus
    worker = system.worker(LMDB.name)
    bus.request(LMDB.write_topic, LMDB.write(0), timeout=REQUEST_TIMEOUT)
    worker.kill()
    publish_all(bus, LMDB.write_topic, [LMDB.write(i) for i in range(1, 10)])
    read = bus.request_nowait(working.CONTEXT_GET, {"session_id": "contract"}, timeout=REQUEST_TIMEOUT)
    worker.start()
    wait_caught_up(bus, LMDB.name)
    assert len(to_builtins(reply_message(read.result(REQUEST_TIMEOUT)).payload)["values"]) == 10
    assert list(bus.replay(topic=DEAD_LETTER_TOPIC)) == []
