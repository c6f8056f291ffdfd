"""The log's journal: where a commit becomes durable, with one write and one fdatasync.

A synced LMDB commit flushes the disk twice (its pages, then its meta page) and writes every page it
touched; a journal frame is one write (``pwritev``) into a preallocated file and one ``fdatasync``. The
event log (bus/log.py) acknowledges a batch once its frame is here and copies frames into LMDB behind it, in
synced commits of many frames; each of those commits records the next frame it expects (epoch, number).

A frame is ``magic | body length | crc32 | epoch | number | body``. Frames are written back to back from
the start of the file; once LMDB holds all of them, the next frame starts a new epoch at offset 0 over
the old ones. Reading stops at the first frame that is torn, damaged, or not the successor of the one
before it, so leftovers of an older epoch after the newest frames are never taken for new ones.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import structlog

from bus.filelock import try_lock
from contracts.errors import StoreError, StoreUnavailable

log = structlog.get_logger("membus.journal")

_sync = getattr(os, "fdatasync", os.fsync)
"""fdatasync where there is one (not macOS, not Windows)."""


def _write(fd: int, offset: int, header: bytes, body: bytes) -> int:
    """Header and body at ``offset`` in one system call, without joining them (a frame can be megabytes)."""
    if hasattr(os, "pwritev"):
        return os.pwritev(fd, [header, body], offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, header + body)


MAGIC = b"MBJ1"
_FRAME = struct.Struct(">4sIIQQ")
DEFAULT_SIZE = 16 << 20
"""Preallocated (fallocate: an overwrite syncs faster than an append, which also changes the file's size)."""


class Frame(NamedTuple):
    epoch: int
    number: int
    body: bytes


class Journal:
    def __init__(self, path: Path, size: int = DEFAULT_SIZE) -> None:
        self.path = Path(path)
        self.size = size
        self.offset = 0
        """Where the next frame goes."""
        self._fd = -1

    def open(self) -> list[Frame]:
        """Opens (creating and preallocating if needed) and returns the frames found from the start, in order.

        Raises StoreError if another process has it open: one broker per log."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0), 0o600)
        if not try_lock(self._fd):
            self.close()
            raise StoreError("the event log is open in another process (is a broker already running on this home?)",
                             path=str(self.path))
        length = os.fstat(self._fd).st_size
        if length < self.size:
            try:
                self._preallocate(self.size)
            except OSError as exc:
                self.close()
                raise StoreUnavailable(f"no room for the log's journal ({self.size >> 20} MiB) at {self.path}: "
                                       f"{exc.strerror}", path=str(self.path)) from exc
        self.size = max(self.size, length)
        frames = self._scan()
        self.offset = 0
        return frames

    def _preallocate(self, size: int) -> None:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(self._fd, 0, size)
        else:
            os.ftruncate(self._fd, size)
        os.fsync(self._fd)

    def _scan(self) -> list[Frame]:
        os.lseek(self._fd, 0, os.SEEK_SET)
        data = os.read(self._fd, self.size)
        frames: list[Frame] = []
        at = 0
        while at + _FRAME.size <= len(data):
            magic, length, crc, epoch, number = _FRAME.unpack_from(data, at)
            end = at + _FRAME.size + length
            if magic != MAGIC or end > len(data):
                break
            body = data[at + _FRAME.size:end]
            if zlib.crc32(body, zlib.crc32(data[at + 12:at + _FRAME.size])) != crc:
                log.warning("journal.torn_frame", offset=at, epoch=epoch, number=number)
                break
            if frames and (epoch, number) != (frames[-1].epoch, frames[-1].number + 1):
                break  # a leftover of an older epoch
            frames.append(Frame(epoch, number, body))
            at = end
        return frames

    def room(self, body_len: int) -> bool:
        return self.offset + _FRAME.size + body_len <= self.size

    def append(self, epoch: int, number: int, body: bytes) -> None:
        """Writes a frame after the last one and syncs it; the caller checked ``room`` (or ``rewind``-ed)."""
        tail = _FRAME.pack(MAGIC, len(body), 0, epoch, number)[12:]
        header = _FRAME.pack(MAGIC, len(body), zlib.crc32(body, zlib.crc32(tail)), epoch, number)
        size = len(header) + len(body)
        if self.offset + size > self.size:
            self._extend(self.offset + size)
        written = _write(self._fd, self.offset, header, body)
        if written != size:
            raise OSError(f"short journal write: {written} of {size} bytes")
        _sync(self._fd)
        self.offset += size

    def rewind(self) -> None:
        """The next frame goes to the start: only once every frame written so far is held elsewhere."""
        self.offset = 0

    def _extend(self, size: int) -> None:
        self.size = max(size, 2 * self.size)
        self._preallocate(self.size)
        log.info("journal.grown", size=self.size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
