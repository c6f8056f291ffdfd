"""The log writer: a quiet broker's lone publish is written on its own thread, anything else in order on the
writer thread, a failed write halts the writer with the batches it could not write, and applying the journal to
LMDB (on the applier thread) never holds a write up."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lmdb
import msgspec
import pytest

from bus import log as log_module
from bus import writer as writer_module
from bus.log import EventLog, Prepared
from bus.writer import LogWriter, Report
from contracts.envelope import make_envelope
from contracts.errors import StoreError


class RecordingLog(EventLog):
    """A real log that notes which thread wrote each batch and can hold the writer thread inside a write, or
    the applier inside an apply."""

    def __init__(self, path: Path, **kwargs: int) -> None:
        super().__init__(path, **kwargs)  # type: ignore[arg-type]
        self.writers: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.inside = threading.Event()
        self.hold_apply = threading.Event()
        self.hold_apply.set()
        self.inside_apply = threading.Event()

    def write(self, batches: Sequence[Prepared]) -> int:
        self.writers.append(threading.get_ident())
        self.inside.set()
        assert self.hold.wait(30)
        return super().write(batches)

    def _to_lmdb(self, todo: list[Any]) -> None:
        self.inside_apply.set()
        assert self.hold_apply.wait(30)
        super()._to_lmdb(todo)


@pytest.fixture
def log(tmp_path: Path) -> Iterator[RecordingLog]:
    event_log = RecordingLog(tmp_path / "log")
    event_log.open()
    yield event_log
    event_log.close()


def _batch(log: EventLog, n: int, size: int = 10) -> Prepared:
    return log.prepare([make_envelope("test.writer.changed", msgspec.msgpack.encode("x" * size)) for _ in range(n)])


def _land(log: EventLog, writer: LogWriter, timeout: float = 30) -> list[Prepared]:
    landed: list[Prepared] = []
    assert writer.wait_idle(timeout)
    for report in writer.reports():
        assert report.error is None
        log.committed(report.batches)
        if report.applied:
            log.applied(report.applied)
        landed += report.batches
    return landed


def test_an_idle_writer_writes_on_the_callers_thread_and_a_busy_one_queues_in_order(log: RecordingLog) -> None:
    writer = LogWriter(log)
    try:
        first = _batch(log, 1)
        assert writer.write_now(first)
        assert log.writers == [threading.get_ident()]
        assert _land(log, writer) == [first] and log.head == first.last

        log.hold.clear()
        log.inside.clear()
        second, third = _batch(log, 3), _batch(log, 1)
        writer.submit(second)
        assert log.inside.wait(30)  # the writer thread is inside the write of ``second``
        assert not writer.write_now(third)  # not written on this thread, and not queued twice
        writer.submit(third)
        log.hold.set()
        assert _land(log, writer) == [second, third]  # each once, in order
        assert threading.get_ident() not in log.writers[1:]
        assert log.head == third.last and [r.seq for r in log.read(from_seq=1)[0]] == list(range(1, 6))
    finally:
        log.hold.set()
        writer.close()


def test_a_write_is_not_held_up_by_an_apply_in_progress(log: RecordingLog) -> None:
    writer = LogWriter(log)
    try:
        log.hold_apply.clear()
        first = _batch(log, 2)
        assert writer.write_now(first)
        assert log.inside_apply.wait(30)  # the applier took the first frame and is about to commit it
        second = _batch(log, 2)
        writer.submit(second)
        assert _land(log, writer) == [first, second]  # both durable (journaled) while that apply is held
        assert log.lmdb_head == 0
        assert [r.seq for r in log.read(from_seq=1)[0]] == [1, 2, 3, 4]  # served from memory
        log.hold_apply.set()
        deadline = time.monotonic() + 30
        while log.lmdb_head < second.last and time.monotonic() < deadline:
            time.sleep(0.02)
            for report in writer.reports():
                assert report.error is None and not report.batches
                log.applied(report.applied)
        assert log.lmdb_head == second.last  # the frame written during the apply followed in the next one
    finally:
        log.hold_apply.set()
        writer.close()


def test_a_full_map_while_applying_halts_the_applier_and_the_journaled_records_stay_readable(tmp_path: Path) -> None:
    small = RecordingLog(tmp_path / "small", map_size=64 << 10, max_map_size=16 << 20)
    small.open()
    writer = LogWriter(small)
    try:
        big = _batch(small, 4, size=40_000)
        assert writer.write_now(big)
        (journaled,) = writer.reports()
        assert journaled.error is None and journaled.batches == [big]  # durable in the journal: acked
        small.committed(journaled.batches)
        assert [r.seq for r in small.read(from_seq=1)[0]] == [1, 2, 3, 4]  # served from memory
        assert writer.wait_idle(30)
        deadline = time.monotonic() + 30
        reports: list[Report] = []
        while not reports and time.monotonic() < deadline:  # the apply is due 50 ms after the frame
            time.sleep(0.02)
            reports = writer.reports()
        (failed,) = reports
        assert isinstance(failed.error, lmdb.MapFullError) and failed.batches == []
        queued = _batch(small, 1)
        assert writer.write_now(queued)  # writes go on into the journal: a frame is only taken if it will fit
        assert _land(small, writer) == [queued]
        time.sleep(0.2)
        assert writer.reports() == []  # halted: the applier does not try again by itself
        assert small.lmdb_head == 0 and [r.body for r in small.read(from_seq=1)[0]] == big.bodies + queued.bodies
        small.grow()
        small.grow()
        writer.resume_applies()
        deadline = time.monotonic() + 30
        while small.lmdb_head < queued.last and time.monotonic() < deadline:
            time.sleep(0.02)
            _land(small, writer)
        assert small.lmdb_head == small.head == queued.last
    finally:
        writer.close()
        small.close()
    reopened = EventLog(tmp_path / "small", map_size=64 << 10, max_map_size=16 << 20)
    reopened.open()
    try:
        assert [r.body for r in reopened.read(from_seq=1)[0]] == big.bodies + queued.bodies
        assert reopened.lmdb_head == reopened.head == queued.last
    finally:
        reopened.close()


class _FailingWrites:
    """An LMDB environment whose write transactions fail (as on a full disk) while ``failing`` is set."""

    def __init__(self, env: lmdb.Environment) -> None:
        self.env = env
        self.failing = True

    def begin(self, write: bool = False, **kwargs: Any) -> lmdb.Transaction:
        if write and self.failing:
            raise lmdb.DiskError("mdb_txn_commit: No space left on device")
        return self.env.begin(write=write, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)


def test_a_disk_error_while_applying_keeps_the_journal_acking_up_to_a_bound_then_lmdb_catches_up(
        log: RecordingLog, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_module, "MAX_UNAPPLIED", 64 << 10)
    monkeypatch.setattr(writer_module, "APPLY_RETRY_S", 0.1)
    disk = _FailingWrites(log.env)
    log._env = disk  # type: ignore[assignment]
    writer = LogWriter(log)
    try:
        acked: list[Prepared] = []
        refused: list[BaseException] = []
        apply_errors = 0
        acked_at_first_error = -1
        while not refused:
            batch = _batch(log, 4, size=2_000)
            writer.submit(batch)
            assert writer.wait_idle(30)
            time.sleep(0.02)  # let applies come due and fail
            for report in writer.reports():
                if report.batches and report.error is None:
                    log.committed(report.batches)
                    acked += report.batches
                elif report.batches:
                    refused.append(report.error)  # type: ignore[arg-type]
                    log.abandon()
                    writer.resume([], drop_queued=True)
                else:
                    assert isinstance(report.error, lmdb.DiskError)
                    apply_errors += 1
                    if acked_at_first_error < 0:
                        acked_at_first_error = len(acked)
        assert 0 <= acked_at_first_error < len(acked), "frames are still acked while LMDB cannot take them"
        assert isinstance(refused[0], StoreError)
        assert log.lmdb_head == 0 and log.head == acked[-1].last
        assert [r.body for r in log.read(from_seq=1, limit=10_000)[0]] == [b for p in acked for b in p.bodies]
        disk.failing = False
        late = _batch(log, 1)
        writer.submit(late)
        deadline = time.monotonic() + 30
        while log.lmdb_head < late.last and time.monotonic() < deadline:
            time.sleep(0.05)
            for report in writer.reports():  # an apply that failed just before the disk came back is retried
                if report.error is None:
                    log.committed(report.batches)
                    if report.applied:
                        log.applied(report.applied)
        assert log.lmdb_head == log.head == late.last
    finally:
        writer.close()
    log._env = disk.env


def test_a_full_map_reported_by_both_threads_grows_the_map_once(tmp_path: Path) -> None:
    small = EventLog(tmp_path / "small", map_size=64 << 10, max_map_size=16 << 20)
    small.open()
    try:
        big = _batch(small, 4, size=40_000)
        small.write([big])
        small.committed([big])
        with pytest.raises(lmdb.MapFullError):
            small.apply()
        small.grow(after_full=True)  # the applier's report
        assert small.map_size == 128 << 10
        small.grow(after_full=True)  # the writer's, for the same full map: grown already
        assert small.map_size == 128 << 10
        while True:
            try:
                small.applied(small.apply())
                break
            except lmdb.MapFullError:
                small.grow(after_full=True)  # a new full map: grows again
        assert small.map_size > 128 << 10 and small.lmdb_head == big.last
    finally:
        small.close()
