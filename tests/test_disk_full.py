"""A full disk, for real: the broker and a worker run under a file-size limit (RLIMIT_FSIZE), so their stores'
writes fail as they would on a full disk (LMDB and SQLite report it as an I/O error); then the limit is lifted,
as if space had been freed, without restarting anything."""

from __future__ import annotations

import resource
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bus.client import Bus, reply_message
from contracts.errors import BusError, StoreUnavailable
from tests.conftest import BrokerProcess, wait_until
from tests.workers_util import WorkerProcess

pytestmark = pytest.mark.skipif(not hasattr(resource, "prlimit"), reason="needs prlimit (Linux)")


def files_limited_to(size: int) -> Callable[[], None]:
    """A child's preexec_fn: no file of it grows past ``size``; the hard limit stays open, so ``give_room``
    can lift the soft one later. SIGXFSZ ignored: the write fails with EFBIG instead of killing the process."""
    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))
    return limit


def give_room(pid: int) -> None:
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))


def test_a_full_disk_refuses_publishes_as_store_unavailable_and_the_broker_takes_them_again_once_there_is_room(
        tmp_path: Path) -> None:
    home = tmp_path / "home"
    broker = BrokerProcess(home, preexec_fn=files_limited_to(24 << 20)).start()  # the journal is 16 MB
    pad = "x" * 4000
    acked: dict[int, int] = {}
    refusal: BaseException | None = None
    try:
        with Bus.connect(home, module="test") as bus:
            for start in range(0, 20_000, 100):  # 80 MB: far past the limit
                pendings = [(i, bus.publish_nowait("test.fill.changed", {"i": i, "pad": pad}, timeout=30))
                            for i in range(start, start + 100)]
                for i, p in pendings:
                    try:
                        acked[p.result(30)] = i
                    except BusError as exc:
                        refusal = exc
                if refusal is not None:
                    break
            assert isinstance(refusal, StoreUnavailable), refusal
            assert str(home / "log") in refusal.message and "MiB free" in refusal.message
            assert broker.alive

            give_room(broker.proc.pid)  # type: ignore[union-attr]
            after = wait_until(lambda: _publish_or_none(bus, {"i": -2, "pad": ""}), timeout=30, what="room again")
            assert after == max(acked) + 1  # nothing refused took a seq
        broker.kill()
        broker = BrokerProcess(home).start()
        with Bus.connect(home, module="test") as bus:
            logged = {m.seq: m.payload["i"] for m in bus.replay(from_seq=1, timeout=30)}
        assert logged == {**acked, after: -2}  # every acknowledged message, once; no refused one
    finally:
        broker.stop()


def test_requests_on_a_full_broker_disk_are_refused_at_once_or_answered_exactly_once(tmp_path: Path) -> None:
    home = tmp_path / "home"
    broker = BrokerProcess(home, preexec_fn=files_limited_to(24 << 20)).start()
    worker = WorkerProcess(home, "lmdb").start()
    try:
        with Bus.connect(home, module="test") as bus:
            requests = [bus.request_nowait(APPEND["lmdb"], {"conversation_id": f"c{i // 100}", "user_id": "u1",
                                                            "role": "user", "text": f"{i} " + "m" * 4000},
                                           timeout=120) for i in range(10_000)]  # 40 MB: the log fills
            wait_until(lambda: any(r.done and r.error is not None for r in requests), timeout=60, what="a refusal")
            give_room(broker.proc.pid)  # type: ignore[union-attr]  # replies waiting to be logged go in now
            answered = refused = 0
            for r in requests:
                try:
                    reply_message(r.result(120))
                    answered += 1
                except StoreUnavailable:
                    refused += 1
            assert refused > 0 and answered > 0 and answered + refused == 10_000
            logged = {m.id for m in bus.replay(topic=APPEND["lmdb"])}
            replies = [m.causation_id for m in bus.replay(topic="working.message.append.complete")]
        assert len(logged) == answered and sorted(replies) == sorted(logged)  # each logged request answered once
    finally:
        worker.stop()
        broker.stop()


def _publish_or_none(bus: Bus, payload: dict[str, Any]) -> int | None:
    try:
        return bus.publish("test.fill.changed", payload, timeout=10)
    except StoreUnavailable:
        return None


APPEND = {"libsql": "conversation.message.append.request", "lmdb": "working.message.append.request"}


def _held(bus: Bus, worker: str, conversation: str) -> list[str]:
    """The texts the worker's store holds for a conversation."""
    if worker == "libsql":
        page = bus.request("conversation.history.request", {"conversation_id": conversation, "limit": 500})
        return [m.text for m in page.payload.messages]
    return [m.text for m in bus.request("working.recent.request", {"conversation_id": conversation,
                                                                    "limit": 1000}).payload.messages]


@pytest.mark.parametrize("name", ["libsql", "lmdb"])
def test_a_worker_whose_disk_is_full_holds_its_batch_without_failing_or_dead_lettering_it_and_applies_it_later(
        broker: BrokerProcess, name: str) -> None:
    # An ack timeout of 1 s and 2 attempts: without the worker's TOUCH the broker would dead-letter its held
    # messages within seconds (and answer their requesters .failed) while it waits for room.
    worker = WorkerProcess(broker.home.path, name, preexec_fn=files_limited_to(2 << 20),
                           env={"MEMBUS_WORKER_ACK_TIMEOUT_S": "1", "MEMBUS_WORKER_MAX_ATTEMPTS": "2",
                                "MEMBUS_WORKER_RETRY_BACKOFF_S": "0.05"}).start()
    texts = [f"message {i} " + "m" * 3000 for i in range(800)]  # ~2.4 MB: past the 2 MB limit
    try:
        with Bus.connect(broker.home.path, module="test") as bus:
            requests = [bus.request_nowait(APPEND[name], {"conversation_id": f"c{i % 4}", "user_id": "u1",
                                                          "role": "user", "text": text}, timeout=120)
                        for i, text in enumerate(texts)]
            stalled = wait_until(lambda: worker.status().get("stalled"), timeout=60, what="the worker stalled")
            assert "store_unavailable" in stalled
            wait_until(lambda: bus.status()["groups"][name]["inflight"] > 0, what="messages held")
            held_since = worker.status()["updated"]
            wait_until(lambda: worker.status()["updated"] > held_since + 3, timeout=30, what="3 s of stall")
            assert bus.status()["groups"][name]["dead_letters"] == 0
            shown = subprocess.run([sys.executable, "-m", "bus", "status", "--home", str(broker.home.path)],
                                   capture_output=True, text=True, timeout=60).stdout
            assert f"worker {name} cannot write its store" in " ".join(shown.split())

            give_room(worker.proc.pid)  # type: ignore[union-attr]
            for r in requests:
                reply_message(r.result(120))  # a .failed reply would raise
            assert worker.alive and worker.status()["pid"] == worker.proc.pid  # type: ignore[union-attr]
            assert worker.fresh_status()["stalled"] == ""
            assert bus.status()["groups"][name]["dead_letters"] == 0
            for c in range(4):
                assert sorted(_held(bus, name, f"c{c}")) == sorted(texts[c::4])  # each message once
    finally:
        worker.stop()


def test_a_worker_stalls_before_its_store_fills_the_disk_and_a_restart_with_room_applies_everything(
        broker: BrokerProcess) -> None:
    base = {"MEMBUS_WORKER_ACK_TIMEOUT_S": "1", "MEMBUS_WORKER_RETRY_BACKOFF_S": "0.05"}
    worker = WorkerProcess(broker.home.path, "libsql",
                           env={**base, "MEMBUS_WORKER_MIN_FREE_MB": str(1 << 40)}).start()  # more than any disk
    try:
        with Bus.connect(broker.home.path, module="test") as bus:
            requests = [bus.request_nowait(APPEND["libsql"], {"conversation_id": "c1", "user_id": "u1",
                                                              "role": "user", "text": f"message {i}"}, timeout=120)
                        for i in range(20)]
            stalled = wait_until(lambda: worker.status().get("stalled"), timeout=60, what="the worker stalled")
            assert "MiB the worker keeps in reserve" in stalled
            held_since = worker.status()["updated"]
            wait_until(lambda: worker.status()["updated"] > held_since + 3, timeout=30, what="3 s of stall")
            assert not any(r.done for r in requests)  # nothing applied, nothing answered .failed
            assert bus.status()["groups"]["libsql"]["dead_letters"] == 0
            worker.stop()
            worker = WorkerProcess(broker.home.path, "libsql", env=base).start()
            assert [reply_message(r.result(120)).payload.text for r in requests] == [f"message {i}" for i in range(20)]
            assert sorted(_held(bus, "libsql", "c1")) == sorted(f"message {i}" for i in range(20))
    finally:
        worker.stop()


def test_a_broker_without_room_for_its_journal_says_so_and_exits(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bus", "broker", "--home", str(tmp_path / "home")],
                          preexec_fn=files_limited_to(4 << 20), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "no room for the log's journal (16 MiB)" in proc.stderr and "Traceback" not in proc.stderr


def test_a_worker_wedged_in_a_store_call_keeps_its_messages_then_ends_so_a_new_process_recovers(
        broker: BrokerProcess) -> None:
    # The Chroma worker on a full disk hung inside Chroma's upsert after a failed compaction (native code, never
    # returning). The poison backend's "hang" payload stands in for that call.
    from tests.poison_backend import TOPIC

    env = {"MEMBUS_EXTRA_BACKENDS": "poison=tests.poison_backend:PoisonBackend", "MEMBUS_WORKER_ACK_TIMEOUT_S": "1",
           "MEMBUS_WORKER_WEDGED_AFTER_S": "8"}
    worker = WorkerProcess(broker.home.path, "poison", env=env).start()
    try:
        with Bus.connect(broker.home.path, module="test") as bus:
            bus.publish(TOPIC, {"n": 1, "hang": True})
            # 8 ack timeouts pass while it is stuck (the broker dead-letters after 5): the worker's TOUCH keeps it
            assert worker.proc.wait(60) == 1  # type: ignore[union-attr]  # faulthandler's exit
            assert bus.status()["groups"]["poison"]["dead_letters"] == 0
            assert "Timeout (0:00:08)!" in worker.log_tail(20_000)
            assert "poison_backend.py" in worker.log_tail(20_000)  # the stuck call's stack, for the bug report
    finally:
        worker.stop()


def test_a_worker_that_cannot_write_its_status_file_goes_on_applying(broker: BrokerProcess) -> None:
    """On a full disk the status file (run/worker-NAME.json, written through a new .tmp file) failed with ENOSPC
    and the OSError ended the worker, again at every restart, instead of letting it stall and wait for room. A
    folder where the .tmp file goes makes that write fail the same way."""
    worker = WorkerProcess(broker.home.path, "lmdb").start()
    try:
        (broker.home.path / "run" / "worker-lmdb.tmp").mkdir()
        with Bus.connect(broker.home.path, module="test") as bus:
            wait_until(lambda: "worker.status_unwritten" in worker.log_tail() or not worker.alive, timeout=30,
                       what="the worker writing its status")
            assert worker.alive, worker.log_tail()
            for i in range(3):
                bus.request(APPEND["lmdb"], {"conversation_id": "c1", "user_id": "u1", "role": "user",
                                             "text": f"message {i}"}, timeout=30)
            assert sorted(_held(bus, "lmdb", "c1")) == [f"message {i}" for i in range(3)]
            assert worker.alive, worker.log_tail()
    finally:
        worker.stop()
