"""Sortable message ids (ULID: 48-bit millisecond time + 80 random bits, Crockford base32, 26 chars).

Ids made by one process are strictly increasing, even within one millisecond.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_lock = threading.Lock()
_last_ms = 0
_last_rand = 0


def _encode(value: int) -> str:
    out = []
    for _ in range(26):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id() -> str:
    global _last_ms, _last_rand
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            ms = _last_ms
            rand = _last_rand + 1
        else:
            rand = int.from_bytes(os.urandom(10), "big") >> 1  # room to increment
        _last_ms, _last_rand = ms, rand
    return _encode((ms << 80) | (rand & ((1 << 80) - 1)))


def id_time_ms(ulid: str) -> int:
    """The creation time (unix ms) encoded in an id."""
    value = 0
    for ch in ulid[:10]:
        value = (value << 5) | _ALPHABET.index(ch)
    return value
