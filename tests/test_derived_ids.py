"""Worker message ids ordered by seq (``workers.apply.derived_id``), and the cutover that keeps a log's older
replies under their hashed ids: from the id function, through the log's meta, to a rebuild across the upgrade."""

from __future__ import annotations

from pathlib import Path

import lmdb
import msgspec
import pytest

from bus import protocol
from bus.client import Bus
from bus.consistency import rebuild
from bus.home import Home
from bus.log import EventLog
from bus.permissions import _WORKER_ID
from contracts.envelope import make_envelope
from tests.conftest import BrokerProcess, wait_until
from tests.workers_util import System, wait_caught_up
from workers.apply import derived_id

pytestmark = pytest.mark.timeout(300)
HASHED, ORDERED = 21, 37
"""The lengths of the two forms."""


def test_ordered_ids_sort_by_seq_from_the_cutover_and_keep_the_hashed_form_before_it() -> None:
    ids = [derived_id("lmdb", seq, index, ordered_from=100) for seq in (100, 101, 5000, 2**40) for index in
           (0, 1, 999, 1000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {len(i) for i in ids} == {ORDERED}
    assert derived_id("lmdb", 99, 1000, ordered_from=100) == derived_id("lmdb", 99, 1000)  # before: as ever
    assert len(derived_id("lmdb", 99, 1000, ordered_from=100)) == HASHED
    assert derived_id("libsql", 100, 0, ordered_from=1) != derived_id("lmdb", 100, 0, ordered_from=1)
    assert all(_WORKER_ID.match(i) for i in [*ids, derived_id("lmdb", 99, 0)])  # modules may take neither form


def _append(log: EventLog, count: int) -> None:
    log.append([make_envelope("app.note.created", msgspec.msgpack.encode({"i": i})) for i in range(count)])


def _forget_cutover(path: Path) -> None:
    """Makes the log look written by a broker that predates ordered ids: no key in its meta."""
    env = lmdb.open(str(path), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            assert txn.delete(b"ordered_ids", db=env.open_db(b"meta", txn=txn))
    finally:
        env.close()


def test_a_new_log_orders_ids_from_its_first_seq_and_an_older_log_from_the_seq_after_its_head(
        tmp_path: Path) -> None:
    path = tmp_path / "log"
    log = EventLog(path)
    log.open()
    assert log.ordered_ids_from == 1
    _append(log, 5)
    log.close()
    log.open()
    assert log.ordered_ids_from == 1  # kept, not moved to the head
    log.close()
    _forget_cutover(path)
    log.open()
    assert (log.head, log.ordered_ids_from) == (5, 6)
    _append(log, 3)
    log.close()
    log.open()
    assert (log.head, log.ordered_ids_from) == (8, 6)
    log.close()


def _set_context(s: System, tag: str, count: int) -> list[str]:
    """Working-memory writes through the LMDB worker; returns the ids of their replies."""
    return [s.bus.request("working.context.set.request", {"session_id": f"s-{tag}", "key": f"k{i}", "value": tag},
                          timeout=60).id for i in range(count)]


def _set_cutover(path: Path, seq: int) -> None:
    env = lmdb.open(str(path), max_dbs=8)
    try:
        with env.begin(write=True) as txn:
            txn.put(b"ordered_ids", seq.to_bytes(8, "big"), db=env.open_db(b"meta", txn=txn))
    finally:
        env.close()


def test_a_store_rebuilt_across_the_upgrade_logs_no_reply_or_event_twice(tmp_path: Path) -> None:
    """Replies logged before the upgrade keep their hashed ids when the store is rebuilt after it; those after
    it come back ordered. The broker drops every one as a duplicate: nothing is logged twice."""
    home = tmp_path / "home"
    s = System(home)
    try:
        s.start()
        s.broker.stop()
        _set_cutover(Home(home).log_dir, 2**62)  # the broker of "before": every seq below the cutover
        s.broker.start()
        s.worker("lmdb")
        before = _set_context(s, "old", 4)
        assert s.bus.ordered_ids_from == 2**62 and {len(i) for i in before} == {HASHED}
        s.broker.stop()
        _forget_cutover(Home(home).log_dir)  # what a broker that predates ordered ids leaves
        s.broker.start()
        wait_until(lambda: s.bus.ordered_ids_from != 2**62, timeout=30, what="the client greeted again")
        cutover = s.bus.ordered_ids_from
        assert cutover == s.bus.status()["head"] + 1
        after = _set_context(s, "new", 4)
        assert {len(i) for i in after} == {ORDERED}
        wait_caught_up(s.bus, "lmdb")
        head = s.bus.status()["head"]
        logged = list(s.bus.replay(to_seq=head))
        events = [m for m in logged if m.topic == "working.context.changed"]
        assert {len(m.id) for m in events} == {HASHED, ORDERED}  # change events too, on both sides
        assert all((len(m.id) == ORDERED) == (m.seq > cutover) for m in events)

        def context() -> dict[str, object]:
            return dict(s.bus.request("working.context.get.request", {"session_id": "s-old"}, timeout=60)
                        .payload.values)

        kept = context()
        assert kept == {f"k{i}": "old" for i in range(4)}
        rebuild(s.bus, Home(home), "lmdb", timeout=120.0)
        wait_until(lambda: not s.workers["lmdb"].alive, timeout=30, what="the lmdb worker stopped for the rebuild")
        s.worker("lmdb")
        wait_caught_up(s.bus, "lmdb")
        ids = {m.id for m in logged}
        later = [m for m in s.bus.replay(from_seq=head + 1) if m.causation_id in ids]
        assert not later, [(m.topic, m.id) for m in later]
        assert context() == kept
    finally:
        s.close()


def test_a_worker_of_older_code_is_counted_and_named_in_the_brokers_log(broker: BrokerProcess,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process that predates ordered ids (protocol 1) still running beside a newer broker would log its
    replies under hashed ids above the cutover: the broker says so, so the user restarts it."""

    def outdated() -> int:
        with Bus.connect(broker.home.path, module="app") as app:
            return int(app.status()["counters"].get("outdated_workers", 0))

    with Bus.connect(broker.home.path, module="worker-lmdb"):
        pass
    assert outdated() == 0
    monkeypatch.setattr(protocol, "PROTOCOL_VERSION", 1)
    with Bus.connect(broker.home.path, module="worker-lmdb"):
        pass
    monkeypatch.undo()
    assert outdated() == 1
    wait_until(lambda: "client.outdated_worker" in broker.log_path.read_text(), timeout=10,
               what="the warning in the broker's log")
