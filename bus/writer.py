"""The log writer: makes prepared batches durable on its own thread, so the broker's loop keeps receiving,
preparing and delivering while the disk syncs (the journal's fdatasync and LMDB's commit release the GIL).

Everything that arrives while one journal write is in flight becomes the next one (group commit without
a timer). A small batch that finds the writer idle can be written on the caller's thread (``write_now``).
Batches are written in the order they were submitted. A second thread, the applier, copies the journal's
frames to LMDB when they are due (EventLog.apply_due) and reports how far LMDB got: a journal write never
waits behind an LMDB commit, which takes several fdatasyncs (at 10k requests/s, a write that waited for one
was the tail of the store pipeline's latency).

After a failed write the writer halts: the batches it could not write and every one queued behind it
come back in one report, and nothing more is written until the broker ``resume``s it (after growing the
map, or after giving up on them). A full map while applying halts the applier the same way, with no batches
in the report (they are durable already; writes go on, as the journal only takes frames that will fit); any
other failure to apply is reported and tried again later.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

import lmdb
import structlog

from bus.log import EventLog, Prepared

log = structlog.get_logger("membus.writer")


APPLY_RETRY_S = 1.0


@dataclass(slots=True)
class Report:
    batches: list[Prepared]
    error: BaseException | None
    """None: the batches are durable. Otherwise they (and all queued behind them) were not written; with no
    batches, applying the journal to LMDB failed."""
    applied: int = 0
    """Not 0: LMDB holds every record up to this seq (EventLog.applied)."""


class LogWriter:
    def __init__(self, event_log: EventLog) -> None:
        self._log = event_log
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        """The writer thread and ``wait_idle`` callers wait on it."""
        self._apply_cond = threading.Condition(lock)
        """The applier waits on it: a submit wakes the writer, not the applier."""
        self._todo: list[Prepared] = []
        self._reports: deque[Report] = deque()
        self._busy = False
        self._halted = False
        self._apply_halted = False
        self._closing = False
        self._apply_retry_at = 0.0
        self._idle_waiters = 0
        """Threads in ``wait_idle``: the only ones a finished write must wake (the writer thread re-checks its
        work on its own, and waking it for nothing after a ``write_now`` costs the loop a GIL round trip)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._thread = threading.Thread(target=self._run, name="membus-log-writer", daemon=True)
        self._applier = threading.Thread(target=self._run_applies, name="membus-log-applier", daemon=True)
        self._thread.start()
        self._applier.start()

    def fileno(self) -> int:
        """Readable when reports are waiting (register it in the broker's poller)."""
        return self._wake_r

    def submit(self, batch: Prepared) -> None:
        with self._cond:
            self._todo.append(batch)
            self._cond.notify()

    def write_now(self, batch: Prepared) -> bool:
        """Writes ``batch`` on the caller's thread if nothing is queued or being written, and leaves its report
        for ``reports()``; otherwise does nothing and returns False (``submit`` it). An idle broker's lone
        publish skips two thread hand-offs (to the writer and back) on its way to the ack."""
        with self._cond:
            if self._todo or self._busy or self._halted or self._closing:
                return False
            self._busy = True
        self._write([batch])
        return True

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._todo and not self._busy and not self._reports

    def reports(self) -> list[Report]:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        with self._cond:
            out = list(self._reports)
            self._reports.clear()
            return out

    def resume_applies(self) -> None:
        """After a full map while applying (the broker grew it): the applier goes on."""
        with self._cond:
            self._apply_halted = False
            self._apply_cond.notify()

    def resume(self, retry: list[Prepared], *, drop_queued: bool = False) -> None:
        """After a failed write: writes ``retry`` first (the same batches, after the map grew), then what was
        queued meanwhile, or, with ``drop_queued``, nothing of it (the broker gave up on all of them)."""
        with self._cond:
            self._todo = retry if drop_queued else retry + self._todo
            self._halted = False
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            self._idle_waiters += 1
            try:
                return self._cond.wait_for(lambda: (not self._todo or self._halted) and not self._busy, timeout)
            finally:
                self._idle_waiters -= 1

    def close(self) -> None:
        """Stops both threads once the queued batches are written; the log applies what is left when it closes."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._apply_cond.notify()
        self._thread.join(30)
        self._applier.join(30)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._todo and not self._halted and not self._busy):
                    if self._closing and not self._busy:
                        return
                    self._cond.wait(APPLY_RETRY_S / 100 if self._busy else None)  # busy: the loop is in a write_now
                batches, self._todo = self._todo, []
                self._busy = True
            self._write(batches)
            self._wake_loop()

    def _run_applies(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._closing:
                        return
                    due = None if self._apply_halted else self._apply_due()
                    if due == 0:
                        break
                    self._apply_cond.wait(due)
            self._apply()
            self._wake_loop()

    def _wake_loop(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def _apply_due(self) -> float | None:
        due = self._log.apply_due()
        return None if due is None else max(due, self._apply_retry_at - time.monotonic())

    def _write(self, batches: list[Prepared]) -> None:
        """Writes ``batches`` (the caller set ``_busy``) and leaves the report."""
        error: BaseException | None = None
        applied = 0
        try:
            applied = self._log.write(batches)
        except BaseException as exc:  # reported to the broker's loop, which decides
            error = exc
        with self._cond:
            if error is not None:
                batches.extend(self._todo)
                self._todo = []
                self._halted = True
            self._reports.append(Report(batches, error, applied))
            self._busy = False
            if self._idle_waiters:
                self._cond.notify_all()
            if error is None and self._log.unapplied_frames == 1:
                self._apply_cond.notify()  # the applier times the apply of a first frame

    def _apply(self) -> None:
        """Applies the journal's frames to LMDB (on the applier thread) and leaves the report."""
        try:
            report = Report([], None, applied=self._log.apply())
        except lmdb.MapFullError as exc:
            report = Report([], exc)
        except Exception as exc:  # a disk error: the frames are durable in the journal; try again later
            log.error("log.apply_failed", error=repr(exc))
            self._apply_retry_at = time.monotonic() + APPLY_RETRY_S
            report = Report([], exc)
        with self._cond:
            if isinstance(report.error, lmdb.MapFullError):
                self._apply_halted = True
            self._reports.append(report)
            if self._idle_waiters:
                self._cond.notify_all()
