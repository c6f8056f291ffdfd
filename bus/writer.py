"""The log writer: commits prepared batches on its own thread, so the broker's loop keeps receiving,
preparing and delivering while the disk syncs (LMDB releases the GIL in the commit's fsync).

Everything that arrives while one commit is in flight becomes the next commit (group commit without a
timer). A small batch that finds the writer idle can be written on the caller's thread (``write_now``).
Batches are written in the order they were submitted. After a failed write the writer halts: the
batches it could not write and every one queued behind it come back in one report, and nothing more
is written until the broker ``resume``s it (after growing the map, or after giving up on them).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from dataclasses import dataclass

import structlog

from bus.log import EventLog, Prepared

log = structlog.get_logger("membus.writer")


@dataclass(slots=True)
class Report:
    batches: list[Prepared]
    error: BaseException | None
    """None: the batches are durable. Otherwise they (and all queued behind them) were not written."""


class LogWriter:
    def __init__(self, event_log: EventLog) -> None:
        self._log = event_log
        self._cond = threading.Condition()
        self._todo: list[Prepared] = []
        self._reports: deque[Report] = deque()
        self._busy = False
        self._halted = False
        self._closing = False
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
            with self._cond:
                self._cond.wait_for(lambda: self._closing or (self._todo and not self._halted))
                if self._closing and (not self._todo or self._halted):
                    return
                batches, self._todo = self._todo, []
                self._busy = True
            self._write(batches)
            with contextlib.suppress(BlockingIOError):
                os.write(self._wake_w, b"x")

    def _write(self, batches: list[Prepared]) -> None:
        """Writes ``batches`` (the caller set ``_busy``) and leaves the report."""
        error: BaseException | None = None
        try:
            self._log.write(batches)
        except BaseException as exc:  # reported to the broker's loop, which decides
            error = exc
        with self._cond:
            if error is not None:
                batches.extend(self._todo)
                self._todo = []
                self._halted = True
            self._reports.append(Report(batches, error))
            self._busy = False
            if self._idle_waiters:
                self._cond.notify_all()
