"""What a worker was applying when its process ended, so that one message cannot stop its store for good.

A message whose handling ends the process (a crash in native code, an out-of-memory kill, a store call that
never returns and trips the wedge timer) is redelivered to the next run, which it ends too, and so on: the
broker cannot count those deaths, since a store worker rejoins at its own position. So the worker keeps the
count: before each store transaction it writes the range of seqs it is about to apply to a small file, and
blanks it afterwards. A run that finds a range there applies those messages in small chunks, and the messages
of a chunk that ends a process again one per transaction; the range written for a message applied alone
carries the deaths it has caused so far. The runtime answers ``.failed`` and dead-letters a message that has
ended ``max_attempts`` processes applied alone, without running it again.

No fsync: the file only has to outlive the process, not the machine.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("membus.worker")


@dataclass(frozen=True)
class Suspects:
    """``count`` messages in seqs ``first``..``last`` were being applied when a process ended; ``deaths``
    processes have ended while applying exactly this range (this one included)."""

    first: int
    last: int
    deaths: int
    count: int

    def holds(self, seq: int) -> bool:
        return self.first <= seq <= self.last

    def deaths_of(self, seq: int) -> int:
        """How many processes the message ``seq`` ended when applied alone."""
        return self.deaths if self.count == 1 and self.first == seq else 0


RECORD = 64
"""The file is one record of this size, overwritten in place: once its block is allocated, marking and
clearing need no more room on the disk."""


class ApplyingMarker:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def open(self) -> Suspects | None:
        """Opens the file; returns what the previous process was applying when it ended, if anything."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            text = os.pread(self._fd, RECORD, 0).decode(errors="replace").split()
        except OSError as exc:
            self._failed(exc)
            return None
        try:
            first, last, deaths, count = (int(v) for v in text)
        except ValueError:  # blank (a clean stop, a first run) or unreadable: nothing to suspect
            return None
        suspects = Suspects(first, last, deaths + 1, count)
        log.warning("worker.died_while_applying", first_seq=first, last_seq=last, messages=count,
                    deaths=suspects.deaths)
        return suspects

    def mark(self, first: int, last: int, deaths: int, count: int) -> None:
        self._write(b"%d %d %d %d" % (first, last, deaths, count))

    def clear(self) -> None:
        self._write(b"")

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.pwrite(self._fd, data.ljust(RECORD), 0)
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        """The worker goes on without it (its store reports its own trouble): only crash isolation is lost."""
        log.warning("worker.marker_unusable", path=str(self.path), error=repr(exc))
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
