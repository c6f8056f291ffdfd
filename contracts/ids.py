"""Sortable message ids (ULID: 48-bit millisecond time + 80 random bits, Crockford base32, 26 chars).

Ids made by one process are strictly increasing, even within one millisecond.
"""

from __future__ import annotations

import os
import threading
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _ALPHABET for b in _ALPHABET]
"""10 bits -> two characters: encoding is a few table lookups (this runs for every message)."""
_lock = threading.Lock()
_last_ms = -1
_last_rand = 0
_prefix = ""
_high = -1
_high_text = ""
"""The time prefix and the random part's top 60 bits, encoded: within a millisecond only the low 20 bits
change (ids count up from a random start), so a new id usually encodes just two pairs."""


def _encode_time(ms: int) -> str:
    return _ALPHABET[(ms >> 45) & 31] + "".join(_PAIRS[(ms >> s) & 1023] for s in (35, 25, 15, 5)) + \
        _ALPHABET[ms & 31]


def _encode_rand(rand: int) -> str:
    return "".join([_PAIRS[(rand >> s) & 1023] for s in (70, 60, 50, 40, 30, 20, 10, 0)])


def _next_rand() -> int:
    """The next id's random part (the caller holds ``_lock``): one up within the same millisecond, else a
    random start in a new one, with the time prefix of that millisecond."""
    global _last_ms, _prefix, _high
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        return (_last_rand + 1) & ((1 << 80) - 1)
    _last_ms = ms
    _prefix = _encode_time(ms)
    _high = -1
    return int.from_bytes(os.urandom(10), "big") >> 1  # room to increment within the millisecond


def new_id() -> str:
    global _last_rand, _high, _high_text
    with _lock:
        rand = _last_rand = _next_rand()
        high = rand >> 20
        if high != _high:
            _high = high
            _high_text = _prefix + _encode_rand(rand)[:12]
        return _high_text + _PAIRS[(rand >> 10) & 1023] + _PAIRS[rand & 1023]


def new_ids(count: int) -> list[str]:
    """``count`` ids, as ``count`` calls of new_id would make them (one lock and one clock read)."""
    global _last_rand, _high, _high_text
    if count <= 0:
        return []
    ids: list[str] = []
    with _lock:
        rand = _next_rand()
        end = rand + count  # a millisecond starts at most halfway up the random space: no wrap
        while rand < end:
            high = rand >> 20
            stop = min(end, (high + 1) << 20)
            if high != _high:
                _high = high
                _high_text = _prefix + _encode_rand(rand)[:12]
            text, pairs = _high_text, _PAIRS
            ids.extend([text + pairs[(r >> 10) & 1023] + pairs[r & 1023] for r in range(rand, stop)])
            rand = stop
        _last_rand = end - 1
    return ids


def id_time_ms(ulid: str) -> int:
    """The creation time (unix ms) encoded in an id."""
    value = 0
    for ch in ulid[:10]:
        value = (value << 5) | _ALPHABET.index(ch)
    return value
