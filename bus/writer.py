"""The log writer: makes prepared batches durable on its own thread, so the broker's loop keeps receiving,
preparing and delivering while the disk syncs (the journal's fdatasync and LMDB's commit release the GIL).

Everything that arrives while one journal write is in flight becomes the next one (group commit without
a timer). A small batch that finds the writer idle can be written on the caller's thread (``write_now``).
Batches are written in the order they were submitted. Between writes, the same thread applies the
journal's frames to LMDB when they are due (EventLog.apply_due) and reports how far LMDB got.

After a failed write the writer halts: the batches it could not write and every one queued behind it
come back in one report, and nothing more is written until the broker ``resume``s it (after growing the
map, or after giving up on them). A full map while applying halts it the same way, with no batches in
the report (they are durable already); any other failure to apply is reported and tried again later.
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
        self._cond = threading.Condition()
        self._todo: list[Prepared] = []
        self._reports: deque[Report] = deque()
        self._busy = False
        self._halted = False
        self._closing = False
        self._apply_retry_at = 0.0
        self._idle_waiters = 0
        """Threads in ``wait_idle``: the only ones a finished write must wake (the writer thread re-checks its
        work on its own, and waking it for nothing after a ``write_now`` costs the loop a GIL round trip)."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._thread = threading.Thread(target=self._run, name="membus-log-writer", daemon=True)
        self._thread.start()

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

    def resume(self, retry: list[Prepared], *, drop_queued: bool = False) -> None:
        """After a failed write: writes ``retry`` first (the same batches, after the map grew), then what was
        queued meanwhile, or, with ``drop_queued``, nothing of it (the broker gave up on all of them)."""
        with self._cond:
            self._todo = retry if drop_queued else retry + self._todo
            self._halted = False
            self._cond.notify()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            self._idle_waiters += 1
            try:
                return self._cond.wait_for(lambda: (not self._todo or self._halted) and not self._busy, timeout)
            finally:
                self._idle_waiters -= 1

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(30)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _run(self) -> None:
        while True:
            batches: list[Prepared] = []
            with self._cond:
                while True:
                    due = None if self._halted else self._apply_due()
                    if due == 0 and not self._busy:  # busy: the loop thread is in a ``write_now``
                        break  # due frames go to LMDB before more are written: LMDB lags by ~APPLY_AFTER_S
                    if self._todo and not self._halted:
                        batches, self._todo = self._todo, []
                        break
                    if self._closing and not self._busy:
                        if due is not None and time.monotonic() >= self._apply_retry_at:
                            break  # the rest goes to LMDB now
                        return
                    self._cond.wait(APPLY_RETRY_S / 100 if self._busy else due)
                self._busy = True
            if batches:
                self._write(batches)
            else:
                self._apply()
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
            if self._idle_waiters or (error is None and self._log.unapplied_frames == 1):
                self._cond.notify_all()  # the writer thread times the apply of a first frame

    def _apply(self) -> None:
        """Applies the journal's frames to LMDB (the caller set ``_busy``) and leaves the report."""
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
                self._halted = True
            self._reports.append(report)
            self._busy = False
            if self._idle_waiters:
                self._cond.notify_all()
