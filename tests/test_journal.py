"""The log's journal: a batch is durable once its frame is synced, before LMDB holds it. A process that dies
between the two leaves frames that the next open applies; a torn frame (never acknowledged) and leftovers
of an older epoch are not applied."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from bus import log as log_module
from bus.journal import MAGIC, Frame, Journal
from bus.log import EventLog
from contracts.envelope import Envelope, decode_envelope, make_envelope
from contracts.errors import StoreError

_CHILD = textwrap.dedent("""
    import os, sys
    import msgspec
    from pathlib import Path
    from bus import log as log_module
    from bus.log import EventLog
    from contracts.envelope import make_envelope

    path, frames, per_frame, rewind_at = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    log_module.REWIND_AT = rewind_at
    log = EventLog(path)
    log.open()
    n = 0
    for f in range(frames):
        envs = [make_envelope("test.journal.changed", msgspec.msgpack.encode(n + i)) for i in range(per_frame)]
        n += per_frame
        batch = log.prepare(envs, groups={"g": {"floor": n, "patterns": ["test.>"]}})
        log.write([batch])
        log.committed([batch])
        if f == frames - 2 and rewind_at:
            log.applied(log.apply())  # LMDB holds all but the last frame, which starts a new epoch
    print(log.head, log.lmdb_head, flush=True)
    os._exit(0)  # no close: nothing more reaches LMDB
""")


def _crash_after(path: Path, frames: int, per_frame: int = 3, rewind_at: int = 0) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(frames), str(per_frame), str(rewind_at)],
                         capture_output=True, text=True, timeout=120, check=True, cwd=Path(__file__).parent.parent)
    head, in_lmdb = map(int, out.stdout.splitlines()[-1].split())
    return head, in_lmdb


def _frames(path: Path) -> list[Frame]:
    journal = Journal(path)
    try:
        return journal.open()
    finally:
        journal.close()


def _env(value: int) -> Envelope:
    return make_envelope("test.journal.changed", msgspec.msgpack.encode(value))


def _values(log: EventLog) -> list[int]:
    records, _, done = log.read(from_seq=1, limit=10_000)
    assert done
    return [msgspec.msgpack.decode(decode_envelope(r.body).payload) for r in records]


@pytest.fixture
def reopen(tmp_path: Path) -> Iterator[Callable[[], EventLog]]:
    logs: list[EventLog] = []

    def _open() -> EventLog:
        log = EventLog(tmp_path / "log")
        log.open()
        logs.append(log)
        return log

    yield _open
    for log in logs:
        log.close()


_CHILD_DURING_APPLY = textwrap.dedent("""
    import os, sys, threading
    import msgspec
    from pathlib import Path
    from bus.log import EventLog
    from contracts.envelope import make_envelope

    started, go = threading.Event(), threading.Event()

    class HeldApply(EventLog):
        def _to_lmdb(self, todo):
            started.set()
            assert go.wait(30)
            super()._to_lmdb(todo)

    log = HeldApply(Path(sys.argv[1]))
    log.open()

    def frame(first):
        batch = log.prepare([make_envelope("test.journal.changed", msgspec.msgpack.encode(first + i))
                             for i in range(3)])
        log.write([batch])
        log.committed([batch])

    frame(0)
    frame(3)
    applier = threading.Thread(target=lambda: print("applied", log.apply(), flush=True))
    applier.start()
    assert started.wait(30)  # the apply took the two frames and is about to commit them
    frame(6)  # written meanwhile, as the writer thread does
    go.set()
    applier.join(30)
    print(log.head, flush=True)
    os._exit(0)  # no close: the third frame never reaches LMDB
""")


def test_a_frame_written_while_an_apply_commits_is_applied_on_open_after_a_crash(
        tmp_path: Path, reopen: Callable[[], EventLog]) -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD_DURING_APPLY, str(tmp_path / "log")], capture_output=True,
                         text=True, timeout=120, check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.splitlines()[-2:] == ["applied 6", "9"]  # LMDB held 2 of the 3 acknowledged frames
    assert [f.number for f in _frames(tmp_path / "log" / "journal")] == [0, 1, 2]
    log = reopen()
    assert log.head == log.lmdb_head == 9
    assert _values(log) == list(range(9))  # the third frame once, the first two not twice


def test_frames_not_yet_in_lmdb_when_the_process_dies_are_applied_on_open(
        tmp_path: Path, reopen: Callable[[], EventLog]) -> None:
    head, in_lmdb = _crash_after(tmp_path / "log", frames=4)
    assert (head, in_lmdb) == (12, 0)  # all durable, none in LMDB
    log = reopen()
    assert log.head == log.lmdb_head == 12
    assert _values(log) == list(range(12))
    assert log.load_groups()["g"]["floor"] == 12
    assert log.append([_env(12)]) == [13]


def test_a_torn_last_frame_is_not_applied_and_the_frames_before_it_are(
        tmp_path: Path, reopen: Callable[[], EventLog]) -> None:
    _crash_after(tmp_path / "log", frames=3)
    journal = tmp_path / "log" / "journal"
    frames = _frames(journal)
    assert [f.number for f in frames] == [0, 1, 2]
    with journal.open("r+b") as f:  # the last frame's final byte is damaged, as by a write cut short
        size = sum(28 + len(fr.body) for fr in frames)
        f.seek(size - 1)
        last = f.read(1)
        f.seek(size - 1)
        f.write(bytes([last[0] ^ 0xFF]))
    log = reopen()
    assert log.head == 6
    assert _values(log) == list(range(6))


def test_frames_of_an_older_epoch_after_the_newest_are_not_applied_again(
        tmp_path: Path, reopen: Callable[[], EventLog], monkeypatch: pytest.MonkeyPatch) -> None:
    head, in_lmdb = _crash_after(tmp_path / "log", frames=5, rewind_at=1)
    assert (head, in_lmdb) == (15, 12)
    journal = tmp_path / "log" / "journal"
    frames = _frames(journal)
    assert [(f.epoch, f.number) for f in frames] == [(2, 0)]  # the new epoch's first frame, over the old ones
    assert journal.read_bytes().count(MAGIC) >= 4, "the older epoch's frames are still in the file after it"
    log = reopen()
    assert log.head == log.lmdb_head == 15
    assert _values(log) == list(range(15))
    assert log.load_groups()["g"]["floor"] == 15
    monkeypatch.setattr(log_module, "REWIND_AT", 1)
    assert log.append([_env(15)]) == [16]


def test_a_log_open_in_one_place_cannot_be_opened_in_another(tmp_path: Path,
                                                             reopen: Callable[[], EventLog]) -> None:
    first = reopen()
    second = EventLog(tmp_path / "log")
    with pytest.raises(StoreError, match="open in another process"):
        second.open()
    assert first.append([_env(0)]) == [1]  # the first is unharmed


def test_a_retried_id_gets_its_original_seq_before_and_after_lmdb_holds_it(reopen: Callable[[], EventLog]) -> None:
    log = reopen()
    first = _env(1)

    def retried() -> int:
        result = log.prepare([first]).results[0]  # a duplicate adds no record (and takes no seq)
        assert log.seq_of_id(first.id) == result
        return int(result)  # type: ignore[arg-type]

    batch = log.prepare([first, _env(2)])
    log.write([batch])
    log.committed([batch])
    assert retried() == 1  # journaled, not in LMDB
    in_lmdb = log.apply()
    busy = log.prepare([_env(3)])  # LMDB follows a busy log: another batch is on its way meanwhile
    log.applied(in_lmdb)
    assert retried() == 1
    log.write([busy])
    log.committed([busy])
    later = log.prepare([_env(4)])
    log.applied(log.apply())  # the ids of the first batch are dropped from memory: LMDB answers
    assert retried() == 1
    log.write([later])
    log.committed([later])
    log.applied(log.apply())
    assert retried() == 1
    assert _values(log) == [1, 2, 3, 4]


def test_a_big_write_goes_straight_to_lmdb_with_the_frames_before_it(
        tmp_path: Path, reopen: Callable[[], EventLog], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log_module, "DIRECT_ROWS", 3)
    log = reopen()
    small = log.prepare([_env(0), _env(1)])
    assert log.write([small]) == 0  # a journal frame
    log.committed([small])
    big = log.prepare([_env(i) for i in range(2, 6)])
    assert log.write([big]) == 6  # one synced LMDB commit, the frame before it included
    log.committed([big])
    log.applied(6)
    assert log.lmdb_head == 6 and log.unapplied_frames == 0
    log.close()
    again = reopen()  # the journal's frame is not applied a second time
    assert _values(again) == list(range(6)) and again.head == 6


def test_a_frame_past_the_journals_end_grows_it_keeping_the_frames_before(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal", size=64 * 1024)
    assert journal.open() == []
    assert (tmp_path / "journal").read_bytes() == bytes(64 * 1024)
    bodies = [bytes([n]) * 20_000 for n in range(1, 6)]  # the fourth frame no longer fits
    for n, body in enumerate(bodies):
        journal.append(1, n, body)
    journal.close()
    assert (tmp_path / "journal").stat().st_size == 128 * 1024
    assert [(f.number, f.body) for f in _frames(tmp_path / "journal")] == list(enumerate(bodies))
