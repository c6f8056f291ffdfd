"""The log writer: a quiet broker's lone publish is written on its own thread, anything else in order on the
writer thread, and a failed write halts the writer with the batches it could not write."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import lmdb
import msgspec
import pytest

from bus.log import EventLog, Prepared
from bus.writer import LogWriter
from contracts.envelope import make_envelope


class RecordingLog(EventLog):
    """A real log that notes which thread wrote each batch and can hold the writer thread inside a write."""

    def __init__(self, path: Path, **kwargs: int) -> None:
        super().__init__(path, **kwargs)  # type: ignore[arg-type]
        self.writers: list[int] = []
        self.hold = threading.Event()
        self.hold.set()
        self.inside = threading.Event()

    def write(self, batches: Sequence[Prepared]) -> None:
        self.writers.append(threading.get_ident())
        self.inside.set()
        assert self.hold.wait(30)
        super().write(batches)


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


def test_a_write_now_into_a_full_map_halts_the_writer_until_it_is_resumed(tmp_path: Path) -> None:
    small = RecordingLog(tmp_path / "small", map_size=64 << 10, max_map_size=16 << 20)
    small.open()
    writer = LogWriter(small)
    try:
        big = _batch(small, 4, size=40_000)
        assert writer.write_now(big)
        (report,) = writer.reports()
        assert isinstance(report.error, lmdb.MapFullError) and report.batches == [big]
        queued = _batch(small, 1)
        assert not writer.write_now(queued)  # halted: not written
        writer.submit(queued)
        assert small.head == 0
        small.grow()
        small.grow()
        writer.resume(report.batches)
        assert _land(small, writer) == [big, queued]
        assert small.head == queued.last
    finally:
        writer.close()
        small.close()
