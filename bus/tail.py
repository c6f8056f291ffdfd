"""The broker's tail cache: the newest records as the log writer landed them (seq, topic, plaintext envelope),
so consumer groups that keep up with the head never read, nor open, the log.

Records are kept per landed batch, not one by one: adding a batch and dropping the oldest ones when the cache
is over its byte budget cost the same whatever the batch's size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator


class TailCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._chunks: deque[tuple[int, list[str], list[bytes], int]] = deque()
        """(first seq, topics, bodies, bytes) per landed batch, oldest first; seqs follow on without a gap."""
        self.bytes = 0

    def add(self, first: int, topics: list[str], bodies: list[bytes]) -> None:
        """Appends records ``first``, ``first + 1``, ... (the next seqs after the newest), then drops the oldest
        batches while the cache is over its budget."""
        if not bodies:
            return
        chunks = self._chunks
        if chunks and first != self.last + 1:
            chunks.clear()  # not contiguous (cannot happen while the broker lands batches in order): start over
            self.bytes = 0
        size = sum(map(len, bodies))
        chunks.append((first, topics, bodies, size))
        self.bytes += size
        while self.bytes > self.max_bytes and chunks:
            self.bytes -= chunks.popleft()[3]

    @property
    def first(self) -> int:
        """The oldest seq held (0 when empty)."""
        return self._chunks[0][0] if self._chunks else 0

    @property
    def last(self) -> int:
        """The newest seq held (-1 when empty)."""
        if not self._chunks:
            return -1
        first, _, bodies, _ = self._chunks[-1]
        return first + len(bodies) - 1

    def __len__(self) -> int:
        return sum(len(c[2]) for c in self._chunks)

    def covers(self, seq: int) -> bool:
        return bool(self._chunks) and self._chunks[0][0] <= seq <= self.last

    def scan(self, seq: int, limit: int) -> Iterator[tuple[int, str, bytes]]:
        """Records from ``seq`` on, in order, at most ``limit``, as far as the cache holds them."""
        chunks = self._chunks
        at = len(chunks) - 1
        while at >= 0 and chunks[at][0] > seq:  # from the newest: readers are usually near the head
            at -= 1
        if at < 0:
            return
        # Only the batches from ``at`` on, taken before the first yield: copying the whole deque cost a broker
        # with thousands of one-record batches cached more than the records it delivered.
        for first, topics, bodies, _ in [chunks[k] for k in range(at, len(chunks))]:
            for i in range(seq - first, len(bodies)):
                if limit <= 0:
                    return
                limit -= 1
                yield first + i, topics[i], bodies[i]
            seq = first + len(bodies)
